"""``fleetprobe run --workers N``: N shard processes on one machine, one merged result.

Each worker process runs shard I/N of the fleet with its own fleet sessions, observers
and tracker, so a run uses N cores. This process serves one /metrics (the workers'
expositions, combined) and, once every worker has ended, merges their result books, so
objectives, report.json, junit.xml and the summary are those of the whole fleet; their
trace logs are joined into one.

What shards cannot share is refused before anything starts: webhook hops (one receiver
address for all shards), fault injection (one proxy per listen address, one timeline)
and alerts (each shard would alert on its own slice).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from fleetprobe.app.conclusion import RunRecord, RunResult, conclude
from fleetprobe.app.exit_codes import ExitCode
from fleetprobe.app.interruption import Interruption, linger_for_last_scrape
from fleetprobe.app.plan import make_plan
from fleetprobe.app.run import STARTUP_TIMEOUT_S, RunOptions, run_scenario
from fleetprobe.app.scenario import LoadedScenario, load_scenario
from fleetprobe.app.scenario.models import Scenario
from fleetprobe.core.times import iso_utc
from fleetprobe.core.trace_ids import new_run_id
from fleetprobe.exporters.merged_metrics import merge_expositions
from fleetprobe.exporters.results import ResultBook
from fleetprobe.exporters.saturation import merge_reports
from fleetprobe.exporters.server import make_exposition_app
from fleetprobe.probes.chains import ChainSpec
from fleetprobe.transport.links import merge_link_reports
from fleetprobe.transport.servers import ListenError, serve, split_listen

log = logging.getLogger("fleetprobe")

SCRAPE_TIMEOUT_S = 5.0
GRACE_S = 60.0
"""How long past its own bounds (startup, duration, drain) a worker may take before it
is taken for hung and killed."""


def unshardable_parts(scenario: Scenario) -> list[str]:
    """The parts of ``scenario`` that several worker processes cannot run, with why."""
    parts = [
        f"webhook hop {c.name} > {h.name} (one receiver address for every shard)"
        for c in scenario.chains
        for h in c.hops
        if h.kind[1].receives_webhooks
    ]
    if scenario.faults.timeline or scenario.faults.proxies:
        parts.append("faults (one proxy per listen address, one timeline)")
    if scenario.alerts:
        parts.append("alerts (each shard would alert on its own slice)")
    trace_log = scenario.exporters.trace_log
    if trace_log is not None and trace_log.max_size is not None:
        parts.append("a rotated trace log (traces.max_size: each shard would rotate its own)")
    return parts


@dataclass(frozen=True)
class ShardJob:
    """What a worker process is asked to run (crosses the process boundary pickled)."""

    scenario_path: str
    run_id: str
    shard: tuple[int, int]
    duration_s: float | None
    traces_path: str | None
    serve_metrics: bool
    verbose: bool


@dataclass
class _Worker:
    """One worker process as this process sees it."""

    job: ShardJob
    process: Any  # multiprocessing.Process of the spawn context
    results: Connection
    metrics_port: int | None = None
    last_exposition: str = ""
    record: RunRecord | None = None
    exit_code: int | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        index, count = self.job.shard
        return f"shard {index}/{count}"


async def run_workers(
    loaded: LoadedScenario, scenario_path: str, options: RunOptions, count: int
) -> RunResult:
    """Run ``loaded`` as ``count`` shard processes and conclude on the merged results."""
    scenario = loaded.scenario
    refused = unshardable_parts(scenario)
    if refused:
        raise ValueError(f"--workers {count} cannot run {', '.join(refused)}; use --workers 1")
    run_id = options.run_id or new_run_id()  # one for every shard: they are one run
    plan = make_plan(scenario, loaded.base_dir, run_id)
    duration_s = scenario.duration if options.duration_s is None else options.duration_s
    deadline_s = 2 * STARTUP_TIMEOUT_S + duration_s + plan.drain_s + GRACE_S
    prometheus = scenario.exporters.prometheus
    listen = options.metrics_address(scenario)
    started_at, started_ns = iso_utc(time.time_ns()), time.monotonic_ns()
    result = RunResult(ExitCode.OK, {})
    interruption = Interruption()
    workers: list[_Worker] = []
    with tempfile.TemporaryDirectory(prefix="fleetprobe-workers-") as scratch:
        async with AsyncExitStack() as serving:
            if options.handle_signals:
                # Until the merged reports are written and the linger is over.
                serving.enter_context(interruption.installed())
            if listen:
                try:
                    result.metrics_port = await _serve_merged(serving, listen, workers)
                except ListenError as error:
                    log.error("%s", error)
                    result.exit_code = ExitCode.BAD_SCENARIO
                    return result
            trace_log = scenario.exporters.trace_log
            traces = trace_log.path if trace_log is not None else None
            jobs = [
                ShardJob(
                    scenario_path,
                    run_id,
                    (index, count),
                    options.duration_s,
                    str(Path(scratch, f"traces-{index}.jsonl")) if traces else None,
                    serve_metrics=listen is not None,
                    verbose=log.isEnabledFor(logging.DEBUG),
                )
                for index in range(count)
            ]
            await _run_all(jobs, workers, interruption, deadline_s)
            record = _merge(
                run_id, workers, plan.signals, plan.chains, started_at, started_ns, interruption
            )
            if traces:  # the shards that ended with results: their lines have verdicts
                _join_traces([w.job.traces_path for w in workers if w.record is not None], traces)
            shards = [
                {"shard": w.name, "exit_code": w.exit_code, "results": w.record is not None}
                for w in workers
            ]
            conclude(scenario, record, result, options.out, sections={"workers": shards})
            if result.metrics_port is not None and prometheus is not None:
                await linger_for_last_scrape(prometheus.linger, interruption)
    return result


async def _serve_merged(stack: AsyncExitStack, listen: str, workers: list[_Worker]) -> int:
    """Serve the merged /metrics of ``workers`` on ``listen`` until ``stack`` closes."""
    host, port = split_listen(listen)
    runner, bound = await serve(make_exposition_app(_MergedScrape(workers).render), host, port)
    stack.push_async_callback(runner.cleanup)
    log.info("serving merged /metrics on http://%s:%d/metrics", host, bound)
    return bound


async def _run_all(
    jobs: list[ShardJob], workers: list[_Worker], interruption: Interruption, deadline_s: float
) -> None:
    """Start a worker per job and follow them all to their end; whatever goes wrong here,
    no worker outlives this (they are not daemons: they write their own reports)."""
    # One thread per worker blocks in recv() for the whole run: a pool of their own, so
    # the default pool stays free for /metrics.
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="fleetprobe-worker") as pipes:
        try:
            for job in jobs:
                workers.append(_start(job))
            log.info("%d worker processes started, one shard of the fleet each", len(jobs))
            interruption.on_first = lambda: _forward(workers, interruption.signal_number)
            forwarding = asyncio.ensure_future(_forward_again(workers, interruption))
            try:
                async with asyncio.TaskGroup() as group:
                    for worker in workers:
                        group.create_task(_follow(worker, deadline_s, pipes))
            finally:
                forwarding.cancel()
                interruption.on_first = None
        finally:
            for worker in workers:
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join(5)
                worker.results.close()


def _start(job: ShardJob) -> _Worker:
    # spawn, not fork: a forked child would inherit this process's event loop and threads.
    context = multiprocessing.get_context("spawn")
    receiving, sending = context.Pipe(duplex=False)
    process = context.Process(target=_worker_main, args=(job, sending), daemon=False)
    process.start()
    sending.close()  # the worker holds the only sending end: its exit ends recv() with EOF
    return _Worker(job, process, receiving)


async def _follow(worker: _Worker, deadline_s: float, pipes: ThreadPoolExecutor) -> None:
    """Take a worker's messages until it ends (killing it past ``deadline_s``)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(deadline_s):
            while True:
                try:
                    kind, payload = await loop.run_in_executor(pipes, worker.results.recv)
                except EOFError:
                    break
                if kind == "listening":
                    worker.metrics_port = payload
                elif kind == "ended":
                    worker.record, worker.last_exposition = payload
    except TimeoutError:
        log.error("%s did not end within %.0fs: killed", worker.name, deadline_s)
        worker.process.kill()
    await loop.run_in_executor(pipes, worker.process.join)
    worker.exit_code = worker.process.exitcode
    worker.ended.set()
    if worker.record is None:
        log.error("%s ended without results (exit status %s)", worker.name, worker.exit_code)


def _forward(workers: list[_Worker], number: int | None) -> None:
    for worker in workers:
        if number is not None and worker.process.is_alive():
            with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                os.kill(worker.process.pid, number)


async def _forward_again(workers: list[_Worker], interruption: Interruption) -> None:
    await interruption.again
    _forward(workers, interruption.signal_number)


def _merge(
    run_id: str,
    workers: list[_Worker],
    signals: Iterable[str],
    chains: Sequence[ChainSpec],
    started_at: str,
    started_ns: int,
    interruption: Interruption,
) -> RunRecord:
    """One record of the whole fleet from the workers' records."""
    book = ResultBook(list(signals), chains)
    records = [w.record for w in workers if w.record is not None]
    for record in records:
        book.merge(record.book)
    health = [
        change | {"shard": w.name}
        for w in workers
        if w.record is not None
        for change in w.record.health
    ]
    return RunRecord(
        run_id,
        book,
        started_at,
        iso_utc(time.time_ns()),
        (time.monotonic_ns() - started_ns) / 1e9,
        _merged_exit_code(workers, interruption),
        interruption.interrupted or any(r.interrupted for r in records),
        sorted(health, key=lambda change: str(change["at"])),
        merge_reports([r.prober for r in records]),
        merge_link_reports([r.mqtt for r in records]),
        started=any(r.started for r in records),
        output_errors={k: v for r in records for k, v in r.output_errors.items()},
    )


def _merged_exit_code(workers: list[_Worker], interruption: Interruption) -> int:
    """Why the run cannot be judged normally, if a worker could not: the gravest reason."""
    if interruption.signal_number is not None:
        # A worker signalled before it could handle signals ends without results: that is
        # the interruption's doing, not an unreachable target.
        return 128 + interruption.signal_number
    codes = [w.record.exit_code if w.record is not None else ExitCode.UNREACHABLE for w in workers]
    for grave in (ExitCode.BAD_SCENARIO, ExitCode.UNREACHABLE):
        if grave in codes:
            return grave
    return max(codes)  # OK, or 128 + N when a worker alone was signalled


def _join_traces(parts: list[str | None], target: str) -> None:
    """Concatenate the workers' trace logs (shard after shard) into ``target``."""
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for part in parts:
            if part is not None and Path(part).exists():
                with open(part, "rb") as source:
                    shutil.copyfileobj(source, out)


class _MergedScrape:
    """Renders /metrics from every worker's current exposition."""

    def __init__(self, workers: list[_Worker]) -> None:
        self._workers = workers  # filled once the server is up

    async def render(self, _accept: str) -> tuple[bytes, str]:
        workers = list(self._workers)
        await asyncio.gather(*(self._scrape(w) for w in workers))
        texts = [w.last_exposition for w in workers if w.last_exposition]
        body = await asyncio.to_thread(merge_expositions, texts)
        return body, CONTENT_TYPE_LATEST

    async def _scrape(self, worker: _Worker) -> None:
        if worker.metrics_port is None or worker.ended.is_set() or worker.record is not None:
            return  # not serving yet, or its final exposition is in
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
        url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url) as response,
            ):
                text = await response.text()
                # Its final exposition may have come meanwhile: that one stands.
                if response.status == 200 and worker.record is None:
                    worker.last_exposition = text
        except (aiohttp.ClientError, TimeoutError) as error:
            # Ending meanwhile: its last exposition stands until its final one arrives.
            log.debug("%s: /metrics not read: %s", worker.name, error)


def _end_with_parent() -> None:
    """Have Linux send this process SIGTERM when its parent dies (a SIGKILLed fleetprobe
    must not leave its shards publishing); elsewhere, nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


_PR_SET_PDEATHSIG = 1


def _worker_main(job: ShardJob, results: Connection) -> None:
    """A worker process: run one shard and send back its record and final metrics."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the parent alone, which forwards it once
    _end_with_parent()
    index, count = job.shard
    logging.basicConfig(
        level=logging.DEBUG if job.verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s [shard {index}/{count}] %(message)s",
    )
    logging.getLogger("fleetprobe.transport.mqtt").setLevel(logging.WARNING)
    loaded = load_scenario(job.scenario_path)
    trace_log = loaded.scenario.exporters.trace_log
    traces = None  # the shard's own file, with the scenario's sampling
    if trace_log is not None and job.traces_path is not None:
        traces = trace_log.model_copy(update={"path": job.traces_path})
    exporters = loaded.scenario.exporters.model_copy(
        update={"json_path": None, "junit": None, "traces": traces, "prometheus": None}
    )
    scenario = loaded.scenario.model_copy(update={"exporters": exporters})
    registry = CollectorRegistry()
    options = RunOptions(
        duration_s=job.duration_s,
        shard=job.shard,
        run_id=job.run_id,
        metrics_listen="127.0.0.1:0" if job.serve_metrics else None,
        registry=registry,
        on_listening=lambda port: results.send(("listening", port)),
    )
    result = asyncio.run(run_scenario(LoadedScenario(scenario, loaded.base_dir), options))
    results.send(("ended", (result.record, generate_latest(registry).decode())))
    results.close()
    raise SystemExit(result.exit_code)
