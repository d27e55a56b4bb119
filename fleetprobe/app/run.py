"""One run of a scenario: start observers, emit, follow, drain, report, exit code.

Order matters: observers confirm they are listening before the fleet connects and the
first signal is sent, otherwise early signals would be reported lost.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any, TextIO

import simpy
from prometheus_client import CollectorRegistry

from fleetprobe.app.conclusion import RunRecord, RunResult, conclude
from fleetprobe.app.emitter import MAX_WAITING as RECONNECT_BACKLOG
from fleetprobe.app.emitter import Emitter
from fleetprobe.app.exit_codes import ExitCode
from fleetprobe.app.fault_rig import FaultRig
from fleetprobe.app.interruption import INTERRUPT_DRAIN_S, Interruption, linger_for_last_scrape
from fleetprobe.app.outcomes import SignalLedger, judge
from fleetprobe.app.plan import alert_receivers, make_plan
from fleetprobe.app.scenario import LoadedScenario
from fleetprobe.app.scenario.models import Scenario
from fleetprobe.core.blind_spans import TOLERANCE_NS, BlindSpans, LoopWatch
from fleetprobe.core.errors import FleetprobeError
from fleetprobe.core.events import RunEventFanout
from fleetprobe.core.queues import QueueState
from fleetprobe.core.times import iso_utc
from fleetprobe.core.trace_ids import new_run_id
from fleetprobe.exporters.alerts import AlertSender
from fleetprobe.exporters.fault_timeline import render_fault_timeline
from fleetprobe.exporters.health import HealthMonitor, HealthPolicy
from fleetprobe.exporters.links import LinkCollector
from fleetprobe.exporters.live import LiveView
from fleetprobe.exporters.metrics import ProbeMetrics, export_objectives
from fleetprobe.exporters.queues import QueueCollector
from fleetprobe.exporters.results import ResultBook
from fleetprobe.exporters.saturation import SaturationWatch
from fleetprobe.exporters.server import make_metrics_app
from fleetprobe.exporters.traces import TraceLog, TracePolicy
from fleetprobe.probes.observers import Observer, ObserverContext, ObserverSetupError, hop_kinds
from fleetprobe.probes.tracker import CAPACITY as TRACKER_CAPACITY
from fleetprobe.probes.tracker import Tracker, sweep_deadlines
from fleetprobe.simulator.clock import FleetClock
from fleetprobe.simulator.fleet import (
    Vehicle,
    build_fleet,
    made_by_run,
    run_tag,
    shard_of_trace_id,
)
from fleetprobe.simulator.publisher import MqttPublisher
from fleetprobe.transport.errors import ConnectError, TransportError
from fleetprobe.transport.http import HttpClient
from fleetprobe.transport.links import LinkStats
from fleetprobe.transport.servers import ListenError, serve, split_listen

log = logging.getLogger("fleetprobe")

STARTUP_TIMEOUT_S = 30.0
HEALTH_EVERY_S = 1.0
ALERT_FLUSH_S = 5.0


@dataclass
class RunOptions:
    """Settings of one run that are not part of the scenario."""

    duration_s: float | None = None  # overrides the scenario's duration
    shard: tuple[int, int] = (0, 1)
    metrics_listen: str | None = None  # overrides exporters.prometheus.listen
    out: TextIO | None = None  # the live view and the summary; None: progress is only logged
    handle_signals: bool = True
    registry: CollectorRegistry | None = None  # where the metrics live (default: a new one)
    on_listening: Callable[[int], None] | None = None  # told the /metrics port once served
    tracker_capacity: int = TRACKER_CAPACITY  # signals in flight at most
    run_id: str | None = None  # None: a random one (trace ids derive from seed and run id)
    reconnect_backlog: int = RECONNECT_BACKLOG  # signals waiting for their session at most

    def metrics_address(self, scenario: Scenario) -> str | None:
        """Where /metrics is served: this option, else the scenario's, else nowhere."""
        prometheus = scenario.exporters.prometheus
        return self.metrics_listen or (prometheus.listen if prometheus else None)


async def run_scenario(loaded: LoadedScenario, options: RunOptions | None = None) -> RunResult:
    """Run a validated scenario to its end (or an interruption) and write its reports."""
    return await _Run(loaded, options or RunOptions()).execute()


class _Run:
    """The parts of one run and the order in which they start and stop."""

    def __init__(self, loaded: LoadedScenario, options: RunOptions) -> None:
        self.scenario = scenario = loaded.scenario
        self.options = options
        self.run_id = options.run_id or new_run_id()
        self.plan = make_plan(scenario, loaded.base_dir, self.run_id)
        self.duration_s = scenario.duration if options.duration_s is None else options.duration_s
        self.registry = registry = options.registry or CollectorRegistry()
        chains, name = self.plan.chains, scenario.name
        export_objectives(
            registry,
            name,
            [(o.chain, o.hop, m, v) for o in scenario.slo for m, v in o.metrics().items()],
        )
        # The outputs that exist from the start; the trace log and alerts join the run's
        # events when they open, before any event; the live view reads the book and health.
        self.metrics = ProbeMetrics(
            registry,
            name,
            list(self.plan.signals),
            chains,
            faults=[fault.label for fault in scenario.faults.timeline],
            run_id=self.run_id,
        )
        self.book = ResultBook(list(self.plan.signals), chains)
        health = scenario.health
        self.health = HealthMonitor(
            chains,
            HealthPolicy(health.window, health.min_success_ratio, health.min_samples),
            registry,
            name,
        )
        judged = {e.chain for e in scenario.expect}
        self.ledger = SignalLedger({i for i, chain in enumerate(chains) if chain.name in judged})
        self.saturation = SaturationWatch(self._queues, registry, name)
        # What the prober could not see, kept while a signal sent then may still be judged.
        longest_wait_ns = max(round(h.within_s * 1e9) for c in chains for h in c.hops)
        self.blind = BlindSpans(2 * longest_wait_ns + TOLERANCE_NS, self.saturation.blind_span)
        # Every event of the run goes through this one fan-out, to every output.
        self.events = RunEventFanout(
            [self.metrics, self.book, self.health, self.ledger, self.saturation]
        )
        self.faults = FaultRig(scenario.faults, name, registry, scenario.seed, self.events)
        self.emission_start_ns: int | None = None
        self.observers: list[Observer] = []
        self.links: list[LinkStats] = []  # every MQTT session group, as it connects
        LinkCollector(registry, name, lambda: self.links)
        self.emitter: Emitter | None = None
        QueueCollector(registry, name, self._queues)
        self.tracker = Tracker(
            chains,
            self.events,
            _owned_by(options.shard),
            options.tracker_capacity,
            counts_anonymous=options.shard[0] == 0,  # shard 0 counts what carries no id
            blind=self.blind,
            made_here=partial(made_by_run, tag=run_tag(scenario.seed, self.run_id)),
        )
        self.metrics.track_inflight(self.tracker.inflight)
        self.alerts: AlertSender | None = None
        self.metrics_url = ""  # where /metrics is served, once it is
        self.trace_log: TraceLog | None = None
        self.fleet_gone = False  # no fleet session was up when the drain ended
        self.interruption = Interruption()
        self.result = RunResult(ExitCode.OK, {})
        out = options.out
        self.live = LiveView(
            out or sys.stderr,
            self.book,
            self.health,
            scenario=name,
            duration_s=self.duration_s,
            interactive=bool(out is not None and out.isatty()),
        )
        self.live.inflight = lambda: self.tracker.inflight_total

    async def execute(self) -> RunResult:
        """Run every part in order and write the reports, however the run ends."""
        started_at, started_ns = iso_utc(time.time_ns()), time.monotonic_ns()
        trace_log = self.scenario.exporters.trace_log
        async with AsyncExitStack() as serving:
            async with AsyncExitStack() as stack:
                if trace_log is not None:
                    self.trace_log = TraceLog(
                        trace_log.path,
                        self.plan.chains,
                        self.run_id,
                        TracePolicy(trace_log.sample_ok, trace_log.max_size, trace_log.keep),
                        registry=self.registry,
                        scenario=self.scenario.name,
                    )
                    self.events.add(stack.enter_context(self.trace_log))
                try:
                    if self.options.handle_signals:
                        # Until the reports are written and the linger is over.
                        serving.enter_context(self.interruption.installed())
                    await self._serve_metrics(serving)  # outlives the run: see _linger
                    # A signal while connecting ends the start; emission replaces this.
                    self.interruption.on_first = _canceller(asyncio.current_task())
                    await self._start_alerts(stack)
                    observers = await self._start_observers(stack)
                    await self.faults.start(stack)
                    stack.push_async_callback(self.faults.stop)  # before the proxies go
                    vehicles = build_fleet(self.plan.fleet, self.options.shard)
                    publisher = await self._connect_fleet(stack, vehicles)
                    await self._emit_and_follow(vehicles, publisher, observers)
                except asyncio.CancelledError:
                    if not self.interruption.interrupted or self.emission_start_ns is not None:
                        raise
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    log.warning("interrupted while starting: nothing was sent")
                except ListenError as error:
                    log.error("%s", error)
                    self.result.exit_code = ExitCode.BAD_SCENARIO
                except (FleetprobeError, TimeoutError) as error:  # after ListenError: exit 2
                    if isinstance(error, TimeoutError):
                        error = ConnectError(
                            self.plan.broker.url,
                            f"not ready within {STARTUP_TIMEOUT_S:g}s",
                            reason="timeout",
                        )
                    log.error("%s", error)
                    self.result.exit_code = ExitCode.UNREACHABLE
                finally:
                    self.interruption.on_first = None  # a signal now must not cancel the end
                    # What an interruption left in flight is retired while the trace log is open.
                    self.tracker.abort_all()
                    self._note_health_changes()
                    if self.alerts is not None and not await self.alerts.flush(ALERT_FLUSH_S):
                        log.warning(
                            "%d alert notification(s) not delivered before the end",
                            self.alerts.pending,
                        )
            result = self._finish(started_at, started_ns)
            await self._linger()
        return result

    # The parts, in the order they start.

    async def _serve_metrics(self, stack: AsyncExitStack) -> None:
        listen = self.options.metrics_address(self.scenario)
        if not listen:
            return
        host, port = split_listen(listen)
        runner, self.result.metrics_port = await serve(make_metrics_app(self.registry), host, port)
        stack.push_async_callback(runner.cleanup)
        self.metrics_url = metrics_url(host, self.result.metrics_port)
        log.info("serving /metrics on http://%s:%d/metrics", host, self.result.metrics_port)
        if self.options.on_listening is not None:
            self.options.on_listening(self.result.metrics_port)

    async def _linger(self) -> None:
        prometheus = self.scenario.exporters.prometheus
        if self.result.metrics_port is not None and prometheus is not None:
            await linger_for_last_scrape(prometheus.linger, self.interruption)

    async def _start_alerts(self, stack: AsyncExitStack) -> None:
        if not self.scenario.alerts:
            return
        client = await stack.enter_async_context(HttpClient(concurrency=4))
        self.alerts = AlertSender(
            alert_receivers(self.scenario.alerts),
            client,
            scenario=self.scenario.name,
            registry=self.registry,
            generator_url=self.metrics_url,
        )
        self.events.add(self.alerts)
        sending = asyncio.create_task(self.alerts.run())
        stack.callback(sending.cancel)

    async def _start_observers(self, stack: AsyncExitStack) -> list[Observer]:
        context = ObserverContext(
            self.tracker,
            self.plan.broker,
            self.events,
            split_listen(self.scenario.exporters.webhook_receiver.listen),
            self.blind,
        )
        observers = self.observers
        for kind, hops in self.plan.hops_by_kind.items():
            observer = hop_kinds()[kind](hops, context)
            stack.push_async_callback(observer.close)
            async with asyncio.timeout(STARTUP_TIMEOUT_S):
                await observer.start()
            observers.append(observer)
            if observer.link is not None:
                self.links.append(observer.link)
        return observers

    async def _connect_fleet(self, stack: AsyncExitStack, vehicles: list[Vehicle]) -> MqttPublisher:
        mqtt = self.scenario.target.mqtt
        broker = self.faults.through(self.plan.broker, mqtt.via)
        publisher = MqttPublisher(
            broker,
            self.plan.signals,
            [v.vin for v in vehicles],
            sessions=mqtt.sessions,
            pool=mqtt.pool,
        )
        self.links.append(publisher.link)
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            await stack.enter_async_context(publisher)
        log.info(
            "%d vehicles connected to %s%s; emitting for %gs",
            len(vehicles),
            self.plan.broker.url,
            f" through proxy {mqtt.via} ({broker.host}:{broker.port})" if mqtt.via else "",
            self.duration_s,
        )
        return publisher

    async def _emit_and_follow(
        self, vehicles: list[Vehicle], publisher: MqttPublisher, observers: list[Observer]
    ) -> None:
        env = simpy.Environment()
        outbox: list[Any] = []
        for vehicle in vehicles:
            vehicle.start(env, outbox)
        clock = FleetClock(env, outbox, self.scenario.speed)
        self.interruption.on_first = clock.stop
        if self.interruption.interrupted:  # interrupted while connecting
            clock.stop()
        tracker = self.tracker
        emitting = True
        async with asyncio.TaskGroup() as group:
            background = [group.create_task(_observe(o)) for o in observers]
            background.append(group.create_task(self.live.run()))
            background.append(group.create_task(self._watch_health()))
            loop_watch = LoopWatch(self.blind)
            background.append(group.create_task(loop_watch.run()))
            sweeper = group.create_task(
                sweep_deadlines(
                    tracker,
                    lambda: not emitting and tracker.idle,
                    watermark=_watermark(loop_watch, observers, self.blind),
                )
            )
            self.live.phase = "emitting"
            self.emitter = emitter = Emitter(
                publisher,
                tracker,
                self.events,
                self.faults.fleet,
                reconnect_backlog=self.options.reconnect_backlog,
                blind=self.blind,
                loop_busy=lambda: loop_watch.busy,
            )
            if self.trace_log is not None:
                self.trace_log.open()  # only now: a start that fails leaves the last one
            self.emission_start_ns = time.monotonic_ns()
            self.saturation.begin(self.emission_start_ns)
            background.append(
                group.create_task(self.faults.run(self.emission_start_ns, publisher, emitter))
            )
            # What exists now (fleet, plan, sessions) lives all run: keep it out of the
            # collector's full passes, which otherwise stall the loop ~25 ms several times
            # a minute at 10,000 signals/s and show as emission lag (bench/run.py).
            gc.freeze()
            try:
                await clock.run(self.duration_s, emitter.emit)
            finally:
                gc.unfreeze()
            if emitter.queues["qos_acks"].depth:
                log.info(
                    "emission ended; %d QoS 1/2 sends await their acknowledgement",
                    emitter.queues["qos_acks"].depth,
                )
            # Every QoS 1/2 send is acknowledged or counted as failed (a second signal
            # gives up on the acks still awaited).
            await emitter.flush(self.interruption.again)
            emitting = False
            self.live.phase = "draining"
            log.info(
                "emission ended; waiting up to %gs for the last signals' deadlines",
                self.plan.drain_s,
            )
            await self._drain(sweeper)
            # Not one session back by the end of the drain: the target is gone for good.
            self.fleet_gone = publisher.link.connected == 0
            self.live.phase = "done"
            for task in (*background, sweeper):
                task.cancel()

    async def _drain(self, sweeper: asyncio.Task[None]) -> None:
        """Wait until the last signal is judged (the sweeper ends) or the last deadline,
        at most INTERRUPT_DRAIN_S after a first signal, not at all after a second."""
        interruption = self.interruption
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + self.plan.drain_s
        if not interruption.interrupted:
            await asyncio.wait(
                {sweeper, interruption.first, interruption.again},
                timeout=self.plan.drain_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        if interruption.interrupted:
            ends_at = min(ends_at, loop.time() + INTERRUPT_DRAIN_S)
        remaining_s = ends_at - loop.time()
        if remaining_s > 0 and not sweeper.done():
            await asyncio.wait(
                {sweeper, interruption.again},
                timeout=remaining_s,
                return_when=asyncio.FIRST_COMPLETED,
            )

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_EVERY_S)
            self._note_health_changes()
            self._check_saturation(HEALTH_EVERY_S)

    def _check_saturation(self, window_s: float) -> None:
        start_ns = self.emission_start_ns or time.monotonic_ns()
        self.saturation.check((time.monotonic_ns() - start_ns) / 1e9, window_s)

    def _queues(self) -> dict[str, QueueState]:
        """Every bounded queue of the run that exists by now."""
        queues = {f"{o.kind}_observer": o.queue for o in self.observers if o.queue is not None}
        if self.emitter is not None:
            queues.update(self.emitter.queues)
        if self.alerts is not None:
            queues["alerts"] = self.alerts.queue
        return queues

    def _note_health_changes(self) -> None:
        for change in self.health.evaluate(time.monotonic_ns()):
            self.events.health_changed(change)

    def _finish(self, started_at: str, started_ns: int) -> RunResult:
        """Judge the objectives, set the exit code, write the reports and the summary."""
        result, scenario = self.result, self.scenario
        exit_code = result.exit_code
        if exit_code == ExitCode.OK and self.interruption.signal_number is not None:
            exit_code = 128 + self.interruption.signal_number
        unsent = sum(sum(s.send_errors.values()) for s in self.book.signals.values())
        if exit_code == ExitCode.OK and self.fleet_gone and unsent:
            # The target went away for good: no objective can pass a platform that is gone.
            log.error(
                "%s was unreachable when the run ended: %d signals could not be sent",
                self.plan.broker.url,
                unsent,
            )
            exit_code = ExitCode.UNREACHABLE
        result.expectations = judge(
            scenario.expect, self.plan.chains, self.ledger, self.faults.times(), time.monotonic_ns()
        )
        self.faults.record_recoveries(result.expectations)
        record = RunRecord(
            self.run_id,
            self.book,
            started_at,
            iso_utc(time.time_ns()),
            (time.monotonic_ns() - started_ns) / 1e9,
            exit_code,
            self.interruption.interrupted,
            self.health.as_report(),
            self.saturation.as_report(),
            {link.role: link.as_report(iso_utc) for link in self.links},
            started=self.emission_start_ns is not None,
        )
        if self.trace_log is not None and self.trace_log.error is not None:
            record.output_errors["traces"] = self.trace_log.error
        sections, notes = {}, []
        if scenario.faults.timeline:
            sections["faults"] = self.faults.as_report(self.emission_start_ns)
            notes.append(render_fault_timeline(sections["faults"], self.duration_s))
        return conclude(scenario, record, result, self.options.out, sections=sections, notes=notes)


def _canceller(task: asyncio.Task[Any] | None) -> Callable[[], None]:
    def cancel() -> None:
        if task is not None:
            task.cancel()

    return cancel


def _watermark(
    loop: LoopWatch, observers: list[Observer], blind: BlindSpans
) -> Callable[[int], int]:
    """Up to when every observer has handed over what reached it."""

    def watermark(now_ns: int) -> int:
        handed_over = min(o.watermark(now_ns) for o in observers)
        if handed_over < now_ns:  # what still waits was read then, and may have come earlier
            handed_over = blind.earliest_arrival(handed_over) or handed_over
        return min(loop.watermark(now_ns), handed_over)

    return watermark


def _owned_by(shard: tuple[int, int]) -> Callable[[str], bool] | None:
    """Whether a trace id is this shard's to count as unmatched (None: unsharded, all are)."""
    index, count = shard
    if count == 1:
        return None
    return lambda trace_id: shard_of_trace_id(trace_id, count) == index


async def _observe(observer: Observer) -> None:
    try:
        await observer.run()
    except (TransportError, ObserverSetupError) as error:
        # The hops of this observer now time out; that is the finding, not a crash.
        log.error("observer %s stopped: %s", observer.kind, error)


def metrics_url(host: str, port: int) -> str:
    """Where /metrics can be reached: a wildcard listen is reached by the machine's name,
    an IPv6 address in brackets."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"
