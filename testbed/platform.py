"""The whole reference platform in one object: gateway -> processor -> state API -> webhooks.

::

    vehicles/+/+ --gateway--> platform/events/{vin} --processor--> platform/state/{vin}
                                                          |--> StateStore --> GET /vehicles/{vin}
                                                          '--> webhook sender --> POST targets

Each stage has :class:`~testbed.knobs.StageKnobs`, shared with ``POST /control/{stage}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from types import MappingProxyType, TracebackType
from typing import Protocol

from fleetprobe.testbed.gateway import Gateway
from fleetprobe.testbed.knobs import STAGES, StageKnobs, stage_seed
from fleetprobe.testbed.processor import Processor
from fleetprobe.testbed.stage import Counters
from fleetprobe.testbed.state import StateStore
from fleetprobe.testbed.state_api import create_app
from fleetprobe.testbed.topics import TestbedTopics, as_filter
from fleetprobe.testbed.webhooks import WebhookSender, WebhookTarget
from fleetprobe.transport.errors import ConnectError
from fleetprobe.transport.mqtt import BrokerTarget
from fleetprobe.transport.servers import serve, warn_if_open

__all__ = ["Testbed", "TestbedTopics"]

log = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT_S = 10.0


class _Component(Protocol):
    async def run(self) -> None: ...

    async def wait_ready(self) -> None: ...


class Testbed:
    """Runs the gateway, the processor, the state API and the webhook sender.

    Use as an async context manager; once entered, the MQTT subscriptions are confirmed and
    the HTTP server is bound.

    Args:
        broker: the broker the gateway and the processor use.
        http_host: where the state API listens (loopback by default).
        http_port: its port; 0 picks a free one (see :attr:`http_port`).
        webhooks: where the webhook sender POSTs.
        topics: the chain's topics.
        knobs: knobs by stage name; missing stages get default knobs. Change them in place
            (the stages keep these objects).
        seed: seeds the random draws of the default knobs.
        ready_timeout_s: how long the components may take to subscribe.

    Raises:
        ValueError: ``knobs`` names an unknown stage.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        broker: BrokerTarget,
        *,
        http_host: str = "127.0.0.1",
        http_port: int = 0,
        webhooks: Sequence[WebhookTarget] = (),
        topics: TestbedTopics | None = None,
        knobs: Mapping[str, StageKnobs] | None = None,
        seed: int | None = None,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    ) -> None:
        unknown = set(knobs or {}) - set(STAGES)
        if unknown:
            raise ValueError(
                f"unknown stage {sorted(unknown)[0]!r}: expected one of {', '.join(STAGES)}"
            )
        given = dict(knobs or {})
        self.broker = broker
        self.topics = topics if topics is not None else TestbedTopics()
        self.webhooks = tuple(webhooks)
        self.http_host = http_host
        self.ready_timeout_s = ready_timeout_s
        self._knobs = {
            stage: given[stage] if stage in given else StageKnobs(seed=stage_seed(seed, stage))
            for stage in STAGES
        }
        self.counters = Counters()
        """Counts by stage: ``received``, ``forwarded``, ``dropped``, ``sent``, ..."""
        self.store = StateStore()
        """The latest state of each vehicle, as the state API serves it."""
        self._requested_port = http_port
        self._port: int | None = None
        self._stack: AsyncExitStack | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reported: set[asyncio.Task[None]] = set()  # errors wait() raised already

    @property
    def knobs(self) -> Mapping[str, StageKnobs]:
        """Every stage's knobs (the objects the stages and the control endpoint use)."""
        return MappingProxyType(self._knobs)

    @property
    def http_port(self) -> int:
        """The port the HTTP server is bound to."""
        if self._port is None:
            raise RuntimeError("the testbed is not running")
        return self._port

    @property
    def url(self) -> str:
        """The HTTP base URL, like ``http://127.0.0.1:8080``."""
        host = f"[{self.http_host}]" if ":" in self.http_host else self.http_host
        return f"http://{host}:{self.http_port}"

    async def __aenter__(self) -> Testbed:
        async with AsyncExitStack() as stack:
            sender = await stack.enter_async_context(
                WebhookSender(self.webhooks, self._knobs["webhooks"], counters=self.counters)
            )
            stack.push_async_callback(self._stop_components)
            gateway = Gateway(
                self.broker,
                self._knobs["gateway"],
                input_filter=self.topics.vehicles,
                output_topic=self.topics.events,
                counters=self.counters,
            )
            processor = Processor(
                self.broker,
                self._knobs["processor"],
                input_filter=as_filter(self.topics.events),
                output_topic=self.topics.state,
                store=self.store,
                sink=sender,
                counters=self.counters,
            )
            for name, component in (("processor", processor), ("gateway", gateway)):
                await self._start(name, component)
            app = create_app(self.store, self.knobs, self.counters)
            runner, self._port = await serve(app, self.http_host, self._requested_port)
            warn_if_open("the testbed's control endpoint", self.http_host, self._port)
            stack.push_async_callback(runner.cleanup)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        self._port = None
        if stack is not None:
            await stack.aclose()

    async def wait(self) -> None:
        """Serve until cancelled, or raise what ended a component (a lost connection).

        Raises:
            ConnectError: the broker connection was lost.
        """
        if not self._tasks:
            raise RuntimeError("the testbed is not running")
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            self._reported.add(task)
            task.result()
        raise RuntimeError("a testbed component stopped without an error")

    async def _start(self, name: str, component: _Component) -> None:
        task = asyncio.create_task(component.run(), name=f"testbed-{name}")
        self._tasks.append(task)
        ready = asyncio.create_task(component.wait_ready())
        try:
            done, _ = await asyncio.wait(
                {task, ready}, timeout=self.ready_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()  # no-op when it is done
        if task in done:
            self._reported.add(task)
            task.result()  # raises why it ended (ConnectError, a refused subscription)
            raise RuntimeError(f"the testbed {name} stopped before it was ready")
        if ready not in done:
            raise ConnectError(
                self.broker.url, f"the {name} got no subscription in time", reason="timeout"
            )

    async def _stop_components(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        # asyncio.wait does not raise what the tasks raised, and lets a cancellation of
        # this task through.
        await asyncio.wait(tasks)
        for task in tasks:
            error = None if task.cancelled() else task.exception()
            if error is not None and task not in self._reported:
                log.warning("%s had stopped: %s", task.get_name(), error)
