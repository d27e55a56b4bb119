"""The testbed's processor: turns platform events into vehicle state.

``platform/events/+`` in; for each event, after its knobs (drop, delay ± jitter, stall):
``meta.processed_at`` and ``meta.signal`` are added, the vehicle's state is stored (when
newer than the stored one), the enriched event is published to ``platform/state/{vin}``
and handed to the webhook sender. Every event is published and handed on, also one too
old to become the stored state: a probe follows each signal, not only the latest.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import uuid
from typing import Any, Protocol

from fleetprobe.testbed.events import enrich
from fleetprobe.testbed.knobs import StageKnobs
from fleetprobe.testbed.stage import DEFAULT_BACKLOG, Counters, StageRunner
from fleetprobe.testbed.state import StateStore
from fleetprobe.testbed.topics import topic_for, valid_vin, vin_from_topic
from fleetprobe.transport.errors import SendError
from fleetprobe.transport.mqtt import BrokerTarget, InboundMessage, MqttSession

log = logging.getLogger(__name__)

STAGE = "processor"


class EventSink(Protocol):
    """Takes processed events without blocking (the webhook sender)."""

    def submit(self, vin: str, event: dict[str, Any]) -> None:
        """Accept one enriched event."""


class Processor:
    """Consumes platform events, keeps vehicle state, publishes it and passes it on.

    Args:
        broker: the broker to consume from and publish to.
        knobs: the processor's faults (new ones seeded with ``seed`` when None).
        input_filter: the events to consume; its first ``+`` level is the VIN when the
            event has no ``vin``.
        output_topic: where the enriched events go, with ``{vin}``.
        store: the state store to update (a new one when None).
        sink: gets each enriched event after it was published (the webhook sender).
        seed: seeds the knobs' random draws when ``knobs`` is None.
        counters: where to count (a private :class:`Counters` when None).
        backlog: events held (delayed or stalled) at most; more are dropped and counted.
    """

    def __init__(
        self,
        broker: BrokerTarget,
        knobs: StageKnobs | None = None,
        *,
        input_filter: str = "platform/events/+",
        output_topic: str = "platform/state/{vin}",
        store: StateStore | None = None,
        sink: EventSink | None = None,
        seed: int | None = None,
        counters: Counters | None = None,
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        self.broker = broker
        self.knobs = knobs if knobs is not None else StageKnobs(seed=seed)
        self.input_filter = input_filter
        self.output_topic = output_topic
        self.store = store if store is not None else StateStore()
        self.sink = sink
        self.counters = counters if counters is not None else Counters()
        self._stage = StageRunner(STAGE, self.knobs, self.counters, backlog=backlog)
        self._arrivals = itertools.count(1)
        self._ready = asyncio.Event()

    async def wait_ready(self) -> None:
        """Return once the processor's subscription is confirmed."""
        await self._ready.wait()

    async def run(self) -> None:
        """Consume and process until cancelled.

        Raises:
            ConnectError: the broker cannot be reached or the connection was lost.
            RuntimeError: the broker refused the subscription.
        """
        client_id = f"testbed-processor-{uuid.uuid4().hex[:12]}"
        async with MqttSession(self.broker, client_id) as session:
            codes = await session.subscribe([self.input_filter], qos=1)
            if codes[0] >= 0x80:
                raise RuntimeError(f"the broker refused the subscription to {self.input_filter}")
            self._ready.set()
            try:
                async for message in session.messages():
                    self._handle(session, message)
            finally:
                await self._stage.aclose()

    def _handle(self, session: MqttSession, message: InboundMessage) -> None:
        self.counters.add(STAGE, "received")
        # Arrival order, taken before the delay: jitter must not make an old event "newer".
        arrival = next(self._arrivals)
        try:
            event = json.loads(message.payload)
        except ValueError:
            self.counters.add(STAGE, "bad_payload")
            return
        if not isinstance(event, dict):
            self.counters.add(STAGE, "bad_payload")
            return
        vin = str(event.get("vin") or vin_from_topic(self.input_filter, message.topic) or "")
        if not valid_vin(vin):
            self.counters.add(STAGE, "bad_vin")
            return

        async def process() -> None:
            await self._process(session, vin, event, arrival)

        self._stage.submit(process, arrived_ns=message.seen_ns)

    async def _process(
        self, session: MqttSession, vin: str, event: dict[str, Any], arrival: int
    ) -> None:
        enriched = enrich(event)
        if not self.store.update(vin, enriched, arrival):
            self.counters.add(STAGE, "stale")
        try:
            await session.publish(
                topic_for(self.output_topic, vin), json.dumps(enriched).encode(), qos=0
            )
        except SendError as error:  # keep serving; the missing state message is the finding
            self.counters.add(STAGE, "publish_failed")
            log.warning("processor could not publish: %s", error)
        else:
            self.counters.add(STAGE, "forwarded")
        if self.sink is not None:
            self.sink.submit(vin, enriched)
