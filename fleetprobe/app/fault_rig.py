"""A run's fault injection: its proxies, its fault timeline, and the fleet's faults.

Each fault of the scenario becomes a :class:`~faults.timeline.Window` whose apply and
revert act on the right part: a proxy (through the backend), a stage of the platform
(through its control URL), or the fleet (through :class:`~simulator.faults.FleetFaults`
and the publisher).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from contextlib import AsyncExitStack
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from fleetprobe.app.emitter import Emitter
from fleetprobe.app.outcomes import ExpectedOutcome, FaultTimes
from fleetprobe.app.scenario.faults import FaultConfig, FaultsConfig, target_of
from fleetprobe.core.events import RunEvents
from fleetprobe.core.times import iso_utc
from fleetprobe.faults.backends import BackendError, BuiltinBackend, ProxyBackend, ToxiproxyBackend
from fleetprobe.faults.timeline import Timeline, Window
from fleetprobe.faults.toxics import ToxicSpec
from fleetprobe.simulator.faults import FleetFaults
from fleetprobe.simulator.publisher import MqttPublisher
from fleetprobe.transport.http import HttpClient, HttpError
from fleetprobe.transport.mqtt import BrokerTarget
from fleetprobe.transport.servers import split_listen

log = logging.getLogger("fleetprobe.faults")


class FaultRig:
    """The faults of one run.

    Args:
        config: the scenario's ``faults``.
        scenario: the scenario's name (a metric label).
        registry: where ``fleetprobe_recovery_seconds`` lives.
        seed: seeds the fleet's fault draws and the proxies' randomness.
        events: told when a fault takes effect and when it ends.
    """

    def __init__(
        self,
        config: FaultsConfig,
        scenario: str,
        registry: CollectorRegistry,
        seed: int,
        events: RunEvents,
    ) -> None:
        self.config = config
        self.fleet = FleetFaults(seed)
        self.addresses: dict[str, str] = {}
        self._seed = seed
        self._backend: ProxyBackend | None = None
        self._http: HttpClient | None = None
        self._publisher: MqttPublisher | None = None
        self._emitter: Emitter | None = None
        self._events = events
        self._recovery = Gauge(
            "fleetprobe_recovery_seconds",
            "Seconds from a fault's end until the hop was ok again for good.",
            ["scenario", "chain", "hop"],
            registry=registry,
        )
        self._scenario = scenario
        self.timeline = Timeline([self._window(fault) for fault in config.timeline], self._changed)

    async def start(self, stack: AsyncExitStack) -> None:
        """Create the proxies (before the fleet connects through them).

        Raises:
            BackendError: a proxy could not be created.
        """
        kinds = {target_of(fault.kind) for fault in self.config.timeline}
        if self.config.proxies or "proxy" in kinds:
            backend: ProxyBackend
            if self.config.backend == "toxiproxy":
                backend = ToxiproxyBackend(self.config.toxiproxy)
            else:
                backend = BuiltinBackend(self._seed)
            self._backend = await stack.enter_async_context(backend)
            for proxy in self.config.proxies:
                listen = await self._backend.create(proxy.name, proxy.listen, proxy.upstream)
                self.addresses[proxy.name] = listen
                log.info("proxy %s: %s -> %s", proxy.name, listen, proxy.upstream)
        if "stage" in kinds:
            self._http = await stack.enter_async_context(HttpClient(concurrency=2))

    def through(self, broker: BrokerTarget, proxy: str | None) -> BrokerTarget:
        """``broker``, reached through ``proxy`` when one is named."""
        if proxy is None:
            return broker
        host, port = split_listen(self.addresses[proxy])
        # Every other setting stays the broker's: credentials, TLS, keepalive, timeouts.
        return dataclasses.replace(broker, host=host, port=port)

    async def run(self, start_ns: int, publisher: MqttPublisher, emitter: Emitter) -> None:
        """Play the timeline from ``start_ns`` (the start of emission, monotonic)."""
        self._publisher, self._emitter = publisher, emitter
        await self.timeline.run(start_ns)

    async def stop(self) -> None:
        """Revert every fault still in force."""
        await self.timeline.revert_active()

    def times(self) -> dict[str, FaultTimes]:
        """When each fault was really in force, by name."""
        return {
            w.name: FaultTimes(w.name, w.applied_ns, w.reverted_ns, tuple(w.errors))
            for w in self.timeline.windows
        }

    def as_report(self, emission_start_ns: int | None) -> list[dict[str, Any]]:
        """The faults as planned and as they happened, for report.json."""
        entries = []
        for window in self.timeline.windows:
            entry: dict[str, Any] = {
                "name": window.name,
                "kind": window.kind,
                "target": window.target,
                "at_s": window.at_s,
                "for_s": window.for_s,
                "applied_at": _wall(window.applied_wall_ns),
                "reverted_at": _wall(window.reverted_wall_ns),
                "affected_signals": self.fleet.affected.get(window.name),
                "errors": window.errors,
            }
            if emission_start_ns is not None and window.applied_ns is not None:
                entry["applied_s"] = round((window.applied_ns - emission_start_ns) / 1e9, 3)
                if window.reverted_ns is not None:
                    entry["reverted_s"] = round((window.reverted_ns - emission_start_ns) / 1e9, 3)
            entries.append(entry)
        return entries

    def record_recoveries(self, outcomes: list[ExpectedOutcome]) -> None:
        """Export the recovery times the expected outcomes measured."""
        for outcome in outcomes:
            if outcome.check == "recovers_within" and outcome.measured is not None:
                assert outcome.hop is not None
                self._recovery.labels(self._scenario, outcome.chain, outcome.hop).set(
                    outcome.measured
                )

    def _changed(self, window: Window, active: bool) -> None:
        self._events.fault_changed(window.name, active)

    def _window(self, fault: FaultConfig) -> Window:
        apply, revert = {
            "proxy": self._proxy_actions,
            "stage": self._stage_actions,
            "fleet": self._fleet_actions,
        }[target_of(fault.kind)](fault)
        return Window(fault.label, fault.kind, fault.target, fault.at, fault.for_, apply, revert)

    def _proxy_actions(self, fault: FaultConfig) -> tuple[Any, Any]:
        proxy = fault.target

        def backend() -> ProxyBackend:
            if self._backend is None:
                raise BackendError("no proxy backend was started")
            return self._backend

        if fault.kind == "down":

            async def take_down() -> None:
                await backend().set_enabled(proxy, False)

            async def bring_back() -> None:
                await backend().set_enabled(proxy, True)

            return take_down, bring_back
        spec = ToxicSpec(
            name=fault.label,
            type=fault.kind,
            stream=fault.stream,
            toxicity=fault.toxicity,
            attributes=fault.attributes(),
        )

        async def add() -> None:
            await backend().add_toxic(proxy, spec)

        async def remove() -> None:
            await backend().remove_toxic(proxy, spec.name)

        return add, remove

    def _stage_actions(self, fault: FaultConfig) -> tuple[Any, Any]:
        url = fault.target
        before: dict[str, Any] = {}

        async def call(method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
            if self._http is None:
                raise BackendError("no HTTP client was started")
            data = None if body is None else json.dumps(body).encode()
            try:
                response = await self._http.request(method, url, body=data)
            except HttpError as error:
                raise BackendError(f"stage control {url}: {error}") from None
            if response.status != 200:
                text = response.body.decode(errors="replace")[:200]
                raise BackendError(f"stage control {url}: {response.status} {text}")
            answer: dict[str, Any] = json.loads(response.body)
            return answer

        async def apply() -> None:
            before.clear()
            before.update(await call("GET"))
            await call("POST", fault.attributes())

        async def revert() -> None:
            await call("POST", before)

        return apply, revert

    def _fleet_actions(self, fault: FaultConfig) -> tuple[Any, Any]:
        name, attributes = fault.label, fault.attributes()
        if fault.kind == "reconnect_storm":
            rng = random.Random(f"{self._seed}/{name}")

            async def storm() -> None:
                if self._publisher is None:
                    raise BackendError("the fleet is not connected")
                dropped = await self._publisher.reconnect_all(attributes["jitter"], rng)
                self.fleet.count(name, dropped)

            return storm, None

        async def start() -> None:
            self.fleet.start(name, fault.kind, attributes)

        async def stop() -> None:
            held = self.fleet.stop(name)
            if held and self._emitter is not None:
                log.info("fault %s: %d held signals sent now", name, len(held))
                await self._emitter.release(held)

        return start, stop


def _wall(wall_ns: int | None) -> str | None:
    return None if wall_ns is None else iso_utc(wall_ns)
