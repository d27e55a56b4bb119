"""One run of a scenario: start observers, emit, follow, drain, report, exit code.

Order matters: observers confirm they are listening before the fleet connects and the
first signal is sent, otherwise early signals would be reported lost.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

import simpy
from prometheus_client import CollectorRegistry

from exporters.junit import write_junit
from exporters.metrics import ProbeMetrics
from exporters.report import build_report, write_json
from exporters.results import ResultBook
from exporters.server import make_metrics_app
from exporters.summary import render_summary
from exporters.traces import TraceLog
from fleetprobe.emitter import Emitter
from fleetprobe.exit_codes import ExitCode
from fleetprobe.objectives import Outcome, evaluate
from fleetprobe.plan import RunPlan, make_plan
from fleetprobe.scenario import LoadedScenario
from probes.chains import FollowedSignal
from probes.observers import Observer, ObserverContext, ObserverSetupError, hop_kinds
from probes.tracker import Tracker, sweep_deadlines
from simulator.clock import FleetClock
from simulator.fleet import build_fleet
from simulator.publisher import MqttPublisher, iso_utc
from transport.errors import ConnectError, TransportError
from transport.servers import ListenError, serve, split_listen

log = logging.getLogger("fleetprobe")

INTERRUPT_DRAIN_S = 2.0
STARTUP_TIMEOUT_S = 30.0
PROGRESS_EVERY_S = 10.0


@dataclass
class RunOptions:
    """Settings of one run that are not part of the scenario."""

    duration_s: float | None = None  # overrides the scenario's duration
    shard: tuple[int, int] = (0, 1)
    metrics_listen: str | None = None  # overrides exporters.prometheus.listen
    out: TextIO | None = None  # where the summary goes; None: nowhere
    handle_signals: bool = True


@dataclass
class RunResult:
    """What a run ended with."""

    exit_code: int
    report: dict[str, Any]
    outcomes: list[Outcome] = field(default_factory=list)
    metrics_port: int | None = None


class _Listener:
    """Sends the tracker's findings to metrics, the result book and the trace log."""

    def __init__(self, metrics: ProbeMetrics, book: ResultBook, traces: TraceLog | None) -> None:
        self.metrics, self.book, self.traces = metrics, book, traces

    def on_verdict(self, followed: FollowedSignal) -> None:
        self.metrics.verdict(followed)
        self.book.verdict(followed)

    def on_retired(self, followed: FollowedSignal) -> None:
        if self.traces is not None:
            self.traces.write(followed)

    def on_duplicate(self, chain_index: int, hop_index: int) -> None:
        self.metrics.duplicate(chain_index, hop_index)
        self.book.duplicate(chain_index, hop_index)

    def on_unmatched(self, chain_index: int, hop_index: int, reason: str) -> None:
        self.metrics.unmatched_message(chain_index, hop_index, reason)
        self.book.unmatched_message(chain_index, hop_index, reason)

    def poll_error(self, chain_index: int, hop_index: int, reason: str) -> None:
        self.metrics.poll_error(chain_index, hop_index, reason)
        self.book.poll_error(chain_index, hop_index, reason)

    def webhook_rejected(self, chain_index: int, hop_index: int, reason: str) -> None:
        self.metrics.webhook_rejected(chain_index, hop_index, reason)
        self.book.webhook_rejected(chain_index, hop_index, reason)


async def run_scenario(loaded: LoadedScenario, options: RunOptions | None = None) -> RunResult:
    """Run a validated scenario to its end (or an interruption) and write its reports."""
    options = options or RunOptions()
    scenario = loaded.scenario
    plan = make_plan(scenario, loaded.base_dir)
    registry = CollectorRegistry()
    signals = list(plan.signals)
    metrics = ProbeMetrics(registry, scenario.name, signals, plan.chains)
    book = ResultBook(signals, plan.chains)
    started_at, started_ns = iso_utc(time.time_ns()), time.monotonic_ns()
    exporters = scenario.exporters
    result = RunResult(ExitCode.OK, {})
    interruption = _Interruption()

    with ExitStack() as files:
        traces = (
            files.enter_context(TraceLog(exporters.traces, plan.chains))
            if exporters.traces
            else None
        )
        listener = _Listener(metrics, book, traces)
        tracker = Tracker(plan.chains, listener)
        metrics.track_inflight(tracker.inflight)
        try:
            async with AsyncExitStack() as stack:
                listen = options.metrics_listen or (
                    exporters.prometheus.listen if exporters.prometheus else None
                )
                if listen:
                    host, port = split_listen(listen)
                    runner, result.metrics_port = await serve(
                        make_metrics_app(registry), host, port
                    )
                    stack.push_async_callback(runner.cleanup)
                    log.info("serving /metrics on http://%s:%d/metrics", host, result.metrics_port)
                if options.handle_signals:
                    stack.enter_context(interruption.installed())
                context = ObserverContext(
                    tracker, plan.broker, listener, split_listen(exporters.webhook_receiver.listen)
                )
                observers = await _start_observers(plan, context, stack)
                vehicles = build_fleet(plan.fleet, options.shard)
                publisher = MqttPublisher(
                    plan.broker,
                    plan.signals,
                    [v.vin for v in vehicles],
                    sessions=scenario.target.mqtt.sessions,
                    pool=scenario.target.mqtt.pool,
                )
                async with asyncio.timeout(STARTUP_TIMEOUT_S):
                    await stack.enter_async_context(publisher)
                log.info(
                    "%d vehicles connected to %s; emitting for %gs",
                    len(vehicles),
                    plan.broker.url,
                    options.duration_s or scenario.duration,
                )
                await _emit_and_follow(
                    plan,
                    scenario.duration if options.duration_s is None else options.duration_s,
                    scenario.speed,
                    vehicles,
                    Emitter(publisher, tracker, metrics, book),
                    tracker,
                    observers,
                    interruption,
                    book,
                )
        except ListenError as error:
            log.error("%s", error)
            result.exit_code = ExitCode.BAD_SCENARIO
        except (ConnectError, ObserverSetupError, TimeoutError) as error:
            message = (
                str(error)
                if not isinstance(error, TimeoutError)
                else (
                    f"cannot connect to {plan.broker.url}: not ready within {STARTUP_TIMEOUT_S:g}s"
                )
            )
            log.error("%s", message)
            result.exit_code = ExitCode.UNREACHABLE
        tracker.abort_all()  # only an interrupted or failed run has anything left

    if result.exit_code == ExitCode.OK and interruption.signal_number is not None:
        result.exit_code = 128 + interruption.signal_number
    result.outcomes = evaluate(scenario.slo, book)
    if result.exit_code == ExitCode.OK and not all(o.ok for o in result.outcomes):
        result.exit_code = ExitCode.OBJECTIVE_FAILED
    result.report = build_report(
        book,
        scenario=scenario.name,
        started_at=started_at,
        ended_at=iso_utc(time.time_ns()),
        exit_code=result.exit_code,
        interrupted=interruption.signal_number is not None,
        objectives=[o.as_dict() for o in result.outcomes],
    )
    if exporters.json_path:
        write_json(exporters.json_path, result.report)
    if exporters.junit:
        write_junit(
            exporters.junit,
            scenario.name,
            result.outcomes,
            (time.monotonic_ns() - started_ns) / 1e9,
        )
    if options.out is not None:
        print(render_summary(book, scenario.name), file=options.out)
        for outcome in result.outcomes:
            print(
                ("  ok    " if outcome.ok else "  FAIL  ") + outcome.explanation, file=options.out
            )
    return result


async def _start_observers(
    plan: RunPlan, context: ObserverContext, stack: AsyncExitStack
) -> list[Observer]:
    observers = []
    for kind, hops in plan.hops_by_kind.items():
        observer = hop_kinds()[kind](hops, context)
        stack.push_async_callback(observer.close)
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            await observer.start()
        observers.append(observer)
    return observers


async def _emit_and_follow(
    plan: RunPlan,
    duration_s: float,
    speed: float,
    vehicles: list[Any],
    emitter: Emitter,
    tracker: Tracker,
    observers: list[Observer],
    interruption: _Interruption,
    book: ResultBook,
) -> None:
    env = simpy.Environment()
    outbox: list[Any] = []
    for vehicle in vehicles:
        vehicle.start(env, outbox)
    clock = FleetClock(env, outbox, speed)
    interruption.on_first = clock.stop
    if interruption.signal_number is not None:  # interrupted while connecting
        clock.stop()
    emitting = True

    async def progress() -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            log.info("%s", _progress_line(book, tracker))

    async with asyncio.TaskGroup() as group:
        watchers = [group.create_task(_observe(o)) for o in observers]
        reporter = group.create_task(progress())
        sweeper = group.create_task(sweep_deadlines(tracker, lambda: not emitting and tracker.idle))
        await clock.run(duration_s, emitter.emit)
        await emitter.flush()
        emitting = False
        drain_s = max((h.within_s for c in plan.chains for h in c.hops), default=0.0) + 1.0
        if interruption.signal_number is not None:
            drain_s = min(drain_s, INTERRUPT_DRAIN_S)
        await asyncio.wait({sweeper, interruption.again}, timeout=drain_s)
        for task in (*watchers, reporter, sweeper):
            task.cancel()


async def _observe(observer: Observer) -> None:
    try:
        await observer.run()
    except TransportError as error:
        # The hops of this observer now time out; that is the finding, not a crash.
        log.error("observer %s stopped: %s", observer.kind, error)


def _progress_line(book: ResultBook, tracker: Tracker) -> str:
    sent = sum(s.sent for s in book.signals.values())
    judged = ", ".join(
        f"{c.spec.name}: ok {c.verdicts['ok']} failed {c.verdicts['failed']}" for c in book.chains
    )
    inflight = sum(tracker.inflight(i) for i in range(len(tracker.chains)))
    return f"sent {sent}, in flight {inflight}" + (f"; {judged}" if judged else "")


class _Interruption:
    """SIGINT/SIGTERM: the first stops emission and shortens the drain, the second ends it."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self.on_first: Any = None
        self.again: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @contextmanager
    def installed(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        numbers = (signal.SIGINT, signal.SIGTERM)
        for number in numbers:
            loop.add_signal_handler(number, self._received, number)
        try:
            yield
        finally:
            for number in numbers:
                loop.remove_signal_handler(number)

    def _received(self, number: int) -> None:
        if self.signal_number is None:
            self.signal_number = number
            log.warning(
                "%s: stopping emission, draining for at most %gs (again to stop now)",
                signal.Signals(number).name,
                INTERRUPT_DRAIN_S,
            )
            if self.on_first is not None:
                self.on_first()
        elif not self.again.done():
            self.again.set_result(None)
