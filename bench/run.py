"""fleetprobe's benchmarks: its own limits beside the clients underneath it, in one run.

Everything runs against one Mosquitto that this script starts on loopback (with
``set_tcp_nodelay true``), on the same machine, one section after the other:

* ``clients``: the bare publish + subscribe loop, QoS 0, ~200-byte JSON, JSON parsed and
  the id looked up on receipt: Mosquitto's C clients (two processes), aiomqtt (one asyncio
  loop, awaiting each publish) and fleetprobe's own session (one loop).
* ``follow``: ``fleetprobe run`` at a ladder of rates, through 1 and through 3 MQTT hops,
  until emission lag (p99 > 10 ms) or loss shows saturation (the better of two runs);
* ``lag``: emission lag p50/p99 at 25%, 50% and 90% of the 1-hop saturation rate.
* ``overload``: runs at 1.5x and 2x the 1-hop saturation rate against a healthy broker,
  with an objective: the share followed, inconclusive and not followed, the signals
  failed (the prober must blame none) and the exit code (4).
* ``floor``: the broker hop's latency p50/p99/p99.9 as fleetprobe measures it at
  1,000 signals/s and at half its saturation rate, beside the round trip of bare clients
  (fleetprobe's session and aiomqtt) at 1,000/s.
* ``memory``: bytes per in-flight signal with 1,000,000 signals in the tracker.
* ``scrape``: rendering /metrics with every label set of a 10-chain scenario.
* ``http``: the webhook receiver and the http_poll observer with a real tracker, fed by a
  load process (webhook calls over 32 connections; a state API that shows each vehicle's
  signal at once): marks per second.
* ``sessions``: 10,000 per-vehicle MQTT sessions in one process: connect time and memory
  of the sessions, then a run with them (each vehicle every 2 s): follow rate, memory per
  vehicle.

Run: ``python bench/run.py [--quick] [--only follow,floor] [--json bench/results.json]``.
It prints one table per section and, with ``--json``, writes every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleetprobe.core.events import RunEvents  # noqa: E402
from fleetprobe.exporters.saturation import LAG_LIMIT_S  # noqa: E402
from fleetprobe.testbed.mosquitto import MosquittoProcess  # noqa: E402
from fleetprobe.transport.mqtt import BrokerTarget, MqttSession  # noqa: E402

PAYLOAD = json.dumps(
    {
        "vin": "WFP0000000000000",
        "trace_id": "0" * 32,
        "sent_at": "2026-12-01T10:00:00.000000Z",
        "speed_kmh": 57.3,
        "position": {"lat": 48.781234, "lon": 9.181234},
        "battery_pct": 81.5,
    }
).encode()


@dataclass
class Settings:
    """How big each measurement is (``--quick`` makes them small)."""

    messages: int = 100_000
    run_s: float = 8.0
    ladder: tuple[int, ...] = (2_000, 5_000, 8_000, 10_000, 12_000, 15_000, 20_000, 25_000)
    workers_ladder: tuple[int, ...] = (10_000, 14_000, 16_000, 18_000, 20_000, 25_000, 30_000)
    floor_s: float = 10.0
    inflight: int = 1_000_000
    sessions: int = 10_000
    http_marks: int = 20_000


QUICK = Settings(
    messages=10_000,
    run_s=3.0,
    ladder=(2_000, 8_000),
    workers_ladder=(4_000, 12_000),
    floor_s=3.0,
    inflight=100_000,
    sessions=500,
    http_marks=2_000,
)


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title]
    for row in cells:
        lines.append(
            "  "
            + "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# --------------------------------------------------------------------------
# clients: bare publish + subscribe loops
# --------------------------------------------------------------------------


async def c_clients_rate(broker: MosquittoProcess, count: int) -> float:
    """mosquitto_pub -l into mosquitto_sub, counted by the lines the subscriber prints."""
    topic = "bench/c"
    lines = (PAYLOAD + b"\n") * (count - 1) + b"END\n"
    base = ["-h", broker.host, "-p", str(broker.port), "-t", topic]
    sub = await asyncio.create_subprocess_exec(
        "mosquitto_sub", *base, stdout=asyncio.subprocess.PIPE
    )
    assert sub.stdout is not None
    try:
        async with asyncio.timeout(10):  # the subscriber is ready once it echoes a probe
            while True:
                await _run("mosquitto_pub", *base, "-m", "ready")
                try:
                    async with asyncio.timeout(0.2):
                        if (await sub.stdout.readline()).strip() == b"ready":
                            break
                except TimeoutError:
                    continue
        started = time.perf_counter()
        pub = await asyncio.create_subprocess_exec(
            "mosquitto_pub", *base, "-l", stdin=asyncio.subprocess.PIPE
        )
        feeding = asyncio.create_task(pub.communicate(lines))
        received = 0
        async with asyncio.timeout(120):
            while (line := await sub.stdout.readline()) != b"END\n":
                received += line != b"ready\n"
        elapsed = time.perf_counter() - started
        await feeding
        return (received + 1) / elapsed
    finally:
        sub.kill()
        await sub.wait()


async def _run(*command: str) -> None:
    process = await asyncio.create_subprocess_exec(*command)
    await process.wait()


async def session_rate(target: BrokerTarget, count: int) -> float:
    """fleetprobe's MqttSession: publish each (QoS 0) and receive, parse, match in one loop."""
    topic = "bench/session"
    wanted = {f"{i:032x}" for i in range(count)}
    async with MqttSession(target) as subscriber, MqttSession(target) as publisher:
        await subscriber.subscribe([topic], qos=0)
        started = time.perf_counter()

        async def publish() -> None:
            for i in range(count):
                await publisher.publish(topic, _payload(i))

        sender = asyncio.create_task(publish())
        await _receive(subscriber.messages(), count, wanted)
        await sender
        return count / (time.perf_counter() - started)


async def aiomqtt_rate(target: BrokerTarget, count: int) -> float:
    """aiomqtt: the same loop, awaiting each publish as its API asks."""
    topic = "bench/aiomqtt"
    wanted = {f"{i:032x}" for i in range(count)}
    async with (
        _aiomqtt_client(target) as sub,
        _aiomqtt_client(target) as pub,
    ):
        await sub.subscribe(topic, qos=0)
        started = time.perf_counter()

        async def publish() -> None:
            for i in range(count):
                await pub.publish(topic, _payload(i))

        sender = asyncio.create_task(publish())
        await _receive(sub.messages, count, wanted)
        await sender
        return count / (time.perf_counter() - started)


def _aiomqtt_client(target: BrokerTarget) -> Any:
    """An aiomqtt client with TCP_NODELAY, as fleetprobe's sessions have it."""
    import aiomqtt

    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return aiomqtt.Client(
        target.host, target.port, protocol=aiomqtt.ProtocolVersion.V5, socket_options=[nodelay]
    )


def _payload(i: int) -> bytes:
    return PAYLOAD.replace(b"0" * 32, f"{i:032x}".encode())


async def _receive(messages: Any, count: int, wanted: set[str]) -> None:
    seen = 0
    async with asyncio.timeout(120):
        async for message in messages:
            body = json.loads(message.payload)
            seen += body["trace_id"] in wanted
            if seen == count:
                return


async def bench_clients(broker: MosquittoProcess, settings: Settings) -> dict[str, Any]:
    target = BrokerTarget(broker.host, broker.port)
    results: dict[str, Any] = {}
    if shutil.which("mosquitto_pub"):
        results["c_clients_msg_s"] = await c_clients_rate(broker, settings.messages)
    results["aiomqtt_msg_s"] = await aiomqtt_rate(target, settings.messages)
    results["fleetprobe_session_msg_s"] = await session_rate(target, settings.messages)
    return results


# --------------------------------------------------------------------------
# fleetprobe runs
# --------------------------------------------------------------------------


def scenario(
    url: str, rate: int, hops: int, duration_s: float, every_s: float = 0.1, **mqtt: Any
) -> dict[str, Any]:
    """``rate`` signals/s from vehicles sending every ``every_s``, followed through ``hops``
    subscriptions that each receive every signal (3 hops: three copies from the broker)."""
    filters = ["bench/+/telemetry", "bench/#", "+/+/telemetry"][:hops]
    return {
        "name": f"bench-{rate}-{hops}",
        "duration": f"{duration_s}s",
        "seed": 1,
        "target": {"mqtt": {"url": url, "sessions": "pooled", "pool": 4, **mqtt}},
        "fleet": {
            "vehicles": max(1, round(rate * every_s)),
            "area": {"lat": 48.78, "lon": 9.18, "radius_km": 10},
            "profiles": [
                {
                    "name": "car",
                    "signals": {"telemetry": {"every": f"{every_s}s", "jitter": "10%"}},
                }
            ],
        },
        "signals": {
            "telemetry": {
                "topic": "bench/{vin}/telemetry",
                "payload": {
                    "vin": "{vin}",
                    "trace_id": "{trace_id}",
                    "sent_at": "{sent_at}",
                    "speed_kmh": "{speed_kmh}",
                    "position": {"lat": "{lat}", "lon": "{lon}"},
                    "battery_pct": "{battery_pct}",
                },
            }
        },
        "chains": [
            {
                "name": "telemetry",
                "signal": "telemetry",
                "hops": [
                    {"name": f"hop{i + 1}", "mqtt": {"topic": f}, "within": "2s"}
                    for i, f in enumerate(filters)
                ],
            }
        ],
        "exporters": {"json": "report.json", "traces": "traces.jsonl"},
    }


@dataclass
class RunFigures:
    rate: int
    sent_per_s: float
    lag_p50_ms: float
    lag_p99_ms: float
    ok_ratio: float
    first_hop_ms: dict[str, float]
    peak_rss_bytes: int

    @property
    def saturated(self) -> bool:
        return self.lag_p99_ms > LAG_LIMIT_S * 1000 or self.ok_ratio < 1.0


async def run_fleetprobe(spec: dict[str, Any], workdir: Path, *options: str) -> RunFigures:
    """``fleetprobe run`` in a process of its own; figures from its report and trace log."""
    path = _write_scenario(spec, workdir)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _PEAK_RSS_RUN,
        "run",
        str(path),
        "--metrics-listen",
        "127.0.0.1:0",
        *options,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    async with asyncio.timeout(300):
        await process.wait()
    return _run_figures(spec, workdir)


_PEAK_RSS_RUN = """
import resource, sys
from fleetprobe.app.cli import main
try:
    code = main(sys.argv[1:])
finally:
    with open("peak_rss", "w") as out:
        out.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
sys.exit(code)
"""
"""``fleetprobe`` that writes its peak resident memory to ``peak_rss`` when it ends (with
--workers: the parent's only; RUSAGE_CHILDREN would carry the bench's earlier runs, since
a child inherits its parent's largest-child figure across fork and exec)."""


def _write_scenario(spec: dict[str, Any], workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "scenario.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run_figures(spec: dict[str, Any], workdir: Path) -> RunFigures:
    report = json.loads((workdir / "report.json").read_text())
    every_s = float(spec["fleet"]["profiles"][0]["signals"]["telemetry"]["every"].rstrip("s"))
    duration_s = float(spec["duration"].rstrip("s"))
    chain = report["chains"]["telemetry"]
    latencies = []
    for line in (workdir / "traces.jsonl").read_text().splitlines():
        hop = json.loads(line)["hops"]["hop1"]
        if "latency_s" in hop:
            latencies.append(hop["latency_s"] * 1000)
    lag = report["emission_lag_s"]
    return RunFigures(
        rate=round(int(spec["fleet"]["vehicles"]) / every_s),
        sent_per_s=report["signals"]["telemetry"]["sent"] / duration_s,
        lag_p50_ms=(lag["p50"] or 0) * 1000,
        lag_p99_ms=(lag["p99"] or 0) * 1000,
        ok_ratio=chain["ok"] / max(1, chain["followed"]),
        first_hop_ms={q: quantile(latencies, v) for q, v in _QS.items()},
        peak_rss_bytes=int((workdir / "peak_rss").read_text()),
    )


async def best_of_two(spec: dict[str, Any], workdir: Path, *options: str) -> RunFigures:
    """The better of two runs, by emission lag p99.

    On a shared machine noise only ever adds delay, so the better run is the closer
    measure of what fleetprobe itself can do; the second run is skipped when the first
    did not saturate.
    """
    first = await run_fleetprobe(spec, workdir / "a", *options)
    if not first.saturated:
        return first
    second = await run_fleetprobe(spec, workdir / "b", *options)
    return min(first, second, key=lambda r: (r.saturated, r.lag_p99_ms))


async def follow_ladder(
    url: str, hops: int, settings: Settings, workdir: Path, workers: int = 1
) -> tuple[list[RunFigures], int]:
    """Runs up the ladder until one saturates; returns them and the highest unsaturated rate."""
    runs: list[RunFigures] = []
    best = 0
    ladder = settings.ladder if workers == 1 else settings.workers_ladder
    for rate in ladder:
        figures = await best_of_two(
            scenario(url, rate, hops, settings.run_s),
            workdir / f"follow-{hops}-{rate}-w{workers}",
            "--workers",
            str(workers),
        )
        runs.append(figures)
        if figures.saturated:
            break
        best = rate
    return runs, best


async def bench_follow(
    broker: MosquittoProcess, settings: Settings, workdir: Path
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for hops in (1, 3):
        runs, best = await follow_ladder(broker.url, hops, settings, workdir)
        results[f"{hops}_hop"] = {"saturation_rate": best, "runs": [vars(r) for r in runs]}
    return results


async def bench_workers(
    broker: MosquittoProcess, settings: Settings, workdir: Path
) -> dict[str, Any]:
    """The follow rate through one hop with ``--workers 2`` (one shard per core)."""
    runs, best = await follow_ladder(broker.url, 1, settings, workdir, workers=2)
    return {"1_hop": {"saturation_rate": best, "runs": [vars(r) for r in runs]}}


async def bare_round_trips(target: BrokerTarget, seconds: float, client: str) -> list[float]:
    """Publish → receive at 1,000/s with a bare client; latencies in ms."""
    topic = f"bench/floor-{client}"
    sent: dict[bytes, int] = {}
    latencies: list[float] = []
    count = int(seconds * 1000)

    async def pace(publish: Callable[[bytes], Awaitable[None]]) -> None:
        start = time.monotonic_ns()
        for i in range(count):
            due = start + i * 1_000_000
            wait = (due - time.monotonic_ns()) / 1e9
            if wait > 0:
                await asyncio.sleep(wait)
            key = f"{i:08d}".encode()
            sent[key] = time.monotonic_ns()
            await publish(key)

    if client == "fleetprobe-session":
        async with MqttSession(target) as sub, MqttSession(target) as pub:
            await sub.subscribe([topic], qos=0)
            sender = asyncio.create_task(pace(lambda key: pub.publish(topic, key + PAYLOAD)))
            async with asyncio.timeout(seconds + 30):
                async for message in sub.messages():
                    latencies.append((message.seen_ns - sent[message.payload[:8]]) / 1e6)
                    if len(latencies) == count:
                        break
            await sender
    else:
        async with (
            _aiomqtt_client(target) as sub,
            _aiomqtt_client(target) as pub,
        ):
            await sub.subscribe(topic, qos=0)
            sender = asyncio.create_task(pace(lambda key: pub.publish(topic, key + PAYLOAD)))
            async with asyncio.timeout(seconds + 30):
                async for message in sub.messages:
                    seen = time.monotonic_ns()
                    payload = message.payload
                    assert isinstance(payload, bytes)
                    latencies.append((seen - sent[payload[:8]]) / 1e6)
                    if len(latencies) == count:
                        break
            await sender
    return latencies


async def bench_floor(
    broker: MosquittoProcess, settings: Settings, workdir: Path, saturation: int
) -> dict[str, Any]:
    target = BrokerTarget(broker.host, broker.port)
    results: dict[str, Any] = {}
    for client in ("fleetprobe-session", "aiomqtt"):
        samples = await bare_round_trips(target, settings.floor_s, client)
        results[f"{client} @1000/s"] = {q: quantile(samples, v) for q, v in _QS.items()}
    rates = {"fleetprobe @1000/s": 1000}
    if saturation:
        rates[f"fleetprobe @{saturation // 2}/s (50% of saturation)"] = saturation // 2
    for name, rate in rates.items():
        figures = await run_fleetprobe(
            scenario(broker.url, rate, 1, settings.floor_s), workdir / f"floor-{rate}"
        )
        results[name] = figures.first_hop_ms
    return results


_QS = {"p50": 0.5, "p99": 0.99, "p99.9": 0.999}


async def bench_lag(
    broker: MosquittoProcess, settings: Settings, workdir: Path, saturation: int
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for share in (0.25, 0.5, 0.9):
        rate = max(10, int(saturation * share) // 10 * 10)
        figures = await best_of_two(
            scenario(broker.url, rate, 1, settings.run_s), workdir / f"lag-{rate}"
        )
        results[f"{round(share * 100)}% ({rate}/s)"] = {
            "p50_ms": figures.lag_p50_ms,
            "p99_ms": figures.lag_p99_ms,
        }
    return results


async def bench_overload(
    broker: MosquittoProcess, settings: Settings, workdir: Path, saturation: int
) -> dict[str, Any]:
    """Runs at 1.5x and 2x the sustainable rate against a healthy broker, each with an
    objective of 0.99: how much the prober followed, how much it could not judge, and
    whether it blamed any hop (it must not)."""
    results: dict[str, Any] = {}
    for factor in (1.5, 2.0):
        rate = int(saturation * factor)
        spec = scenario(broker.url, rate, 1, settings.run_s)
        spec["slo"] = [{"chain": "telemetry", "success_ratio": 0.99}]
        run_dir = workdir / f"overload-{rate}"
        await run_fleetprobe(spec, run_dir)
        report = json.loads((run_dir / "report.json").read_text())
        chain = report["chains"]["telemetry"]
        sent = report["signals"]["telemetry"]["sent"]
        results[f"{factor:g}x ({rate:,}/s)"] = {
            "sent": sent,
            "followed": chain["followed"] / sent,
            "inconclusive": chain["inconclusive"] / sent,
            "not_followed": sum(chain["not_followed"].values()) / sent,
            "failed": chain["failed"],
            "exit_code": report["exit_code"],
            "blind_s": sum(b["seconds"] for b in report["prober"]["blind"].values()),
            "windows_saturated": report["prober"]["windows_saturated"],
        }
    return results


# --------------------------------------------------------------------------
# memory and scrape cost (in-process, no broker)
# --------------------------------------------------------------------------


_INFLIGHT_PROBE = """
import gc, os, sys
from fleetprobe.probes.chains import ChainSpec, HopSpec
from fleetprobe.probes.tracker import Tracker
from fleetprobe.core.events import RunEvents
count = int(sys.argv[1])
chain = ChainSpec("c", "telemetry", (HopSpec("broker", 2.0), HopSpec("gateway", 2.0)))
tracker = Tracker([chain], RunEvents())
ids = [f"{i:032x}" for i in range(count)]
vins = [f"WFP{i % 10000:013d}" for i in range(count)]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
gc.collect()
before = rss()
for i in range(count):
    tracker.follow(0, ids[i], "telemetry", vins[i], i, i, i, {})
gc.collect()
print((rss() - before) / count)
"""


def bench_memory(settings: Settings) -> dict[str, Any]:
    """Peak RSS growth per signal followed (2 hops), in a fresh interpreter.

    The trace id and VIN strings are made before the measurement: they belong to the
    fleet's signals, which exist whether or not anything follows them.
    """
    out = subprocess.run(
        [sys.executable, "-c", _INFLIGHT_PROBE, str(settings.inflight)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return {"signals_in_flight": settings.inflight, "bytes_per_signal": float(out.stdout)}


def bench_scrape() -> dict[str, Any]:
    """Render /metrics with every label set of 10 chains of 4 hops (results counted)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from fleetprobe.exporters.metrics import ProbeMetrics
    from fleetprobe.probes.chains import ChainSpec, HopSpec

    chains = [
        ChainSpec(f"chain-{c}", f"signal-{c}", tuple(HopSpec(f"hop-{h}", 2.0) for h in range(4)))
        for c in range(10)
    ]
    registry = CollectorRegistry()
    ProbeMetrics(registry, "bench", [c.signal for c in chains], chains)
    samples = []
    body = b""
    for _ in range(50):
        start = time.perf_counter()
        body = generate_latest(registry)
        samples.append((time.perf_counter() - start) * 1000)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return {
        "series": series,
        "bytes": len(body),
        "render_ms_p50": quantile(samples, 0.5),
        "render_ms_max": max(samples),
    }


# --------------------------------------------------------------------------
# http observers: marks per second from webhook calls and state-API polls
# --------------------------------------------------------------------------


class _Verdicts(RunEvents):
    """The run's events for the observer benchmarks: counts verdicts, sets ``done``."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.ok = 0
        self.judged = 0
        self.done = asyncio.Event()

    def verdict(self, followed: Any) -> None:
        self.judged += 1
        self.ok += followed.verdict.value == "ok"
        if self.judged == self.expected:
            self.done.set()


_WEBHOOK_LOAD = """
import asyncio, sys, aiohttp
url, count, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def main():
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        ids = iter(range(count))
        async def worker():
            for i in ids:
                async with session.post(url, json={"trace_id": f"{i + 1:032x}"}) as response:
                    await response.read()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
asyncio.run(main())
"""

_STATE_API = """
import sys
from aiohttp import web
async def state(request):
    return web.json_response({"last_trace_id": f"{int(request.match_info['n']) + 1:032x}"})
app = web.Application()
app.router.add_get("/vehicles/{n}", state)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=lambda *a: None)
"""


async def bench_http_observers(settings: Settings) -> dict[str, Any]:
    """The webhook receiver and the http_poll observer, each in this process with a real
    tracker, fed by a load process of its own: marks (verdicts) per second."""
    from fleetprobe.probes.chains import ChainSpec, HopSpec
    from fleetprobe.probes.observers.base import ObserverContext, WatchedHop
    from fleetprobe.probes.observers.http_poll import HttpPollHop, HttpPollObserver
    from fleetprobe.probes.observers.webhook import WebhookHop, WebhookObserver
    from fleetprobe.probes.tracker import Tracker
    from fleetprobe.testbed.mosquitto import free_port

    count = settings.http_marks
    results: dict[str, Any] = {}
    for kind in ("webhook", "http_poll"):
        port = free_port()
        chain = ChainSpec("c", "telemetry", (HopSpec("h", 120.0, latest=True, uses_fields=True),))
        verdicts = _Verdicts(count)
        tracker = Tracker([chain], verdicts)
        context = ObserverContext(
            tracker, BrokerTarget("127.0.0.1", 1), verdicts, ("127.0.0.1", port)
        )
        config: Any
        if kind == "webhook":
            config = WebhookHop(path="/hooks/bench")
            observer: Any = WebhookObserver([WatchedHop(0, 0, "c", "h", config)], context)
            load = [_WEBHOOK_LOAD, f"http://127.0.0.1:{port}/hooks/bench", str(count), "32"]
        else:
            config = HttpPollHop(
                url=f"http://127.0.0.1:{port}/vehicles/{{vin}}",
                every="100ms",
                concurrency=64,
                trace_id="$.last_trace_id",
            )
            observer = HttpPollObserver([WatchedHop(0, 0, "c", "h", config)], context)
            load = [_STATE_API, str(port)]
        now = time.monotonic_ns()
        for i in range(count):
            trace_id = f"{i + 1:032x}"  # an all-zero trace id is invalid (W3C)
            tracker.follow(
                0, trace_id, "telemetry", str(i), now, now, time.time_ns(), {"vin": str(i)}
            )
        server = None
        if kind == "http_poll":
            server = await asyncio.create_subprocess_exec(sys.executable, "-c", *load)
            await _wait_for_port(port)
        await observer.start()
        running = asyncio.create_task(observer.run())
        started = time.perf_counter()
        feeder = None
        if kind == "webhook":
            feeder = await asyncio.create_subprocess_exec(sys.executable, "-c", *load)
        try:
            async with asyncio.timeout(120):
                await verdicts.done.wait()
            elapsed = time.perf_counter() - started
        finally:
            running.cancel()
            await observer.close()
            for process in (feeder, server):
                if process is not None and process.returncode is None:
                    process.kill()
                    await process.wait()
        results[kind] = {"marks": verdicts.ok, "marks_per_s": verdicts.ok / elapsed}
    return results


async def _wait_for_port(port: int) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)  # the server process is starting: poll its port
                continue
            writer.close()
            return


# --------------------------------------------------------------------------
# sessions: many per-vehicle connections in one process
# --------------------------------------------------------------------------


_SESSIONS_PROBE = """
import asyncio, os, sys, time
from fleetprobe.simulator.publisher import MqttPublisher
from fleetprobe.transport.mqtt import BrokerTarget
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
async def main():
    vins = [f"WFPBENCH{i:09d}" for i in range(count)]
    before = rss()
    start = time.perf_counter()
    async with MqttPublisher(BrokerTarget(host, port), {}, vins, sessions="per_vehicle"):
        connected = time.perf_counter() - start
        after = rss()
    print(connected, (after - before) / count)
asyncio.run(main())
"""


async def bench_sessions(
    broker: MosquittoProcess, settings: Settings, workdir: Path
) -> dict[str, Any]:
    """Connect time and memory of the sessions alone, then ``fleetprobe run`` with one
    session per vehicle, each sending every 2 s: its follow rate and its peak memory per
    vehicle beside a 10-vehicle run (fleet model, sessions, signals in flight: all of it)."""
    connect = _sessions_alone(broker, settings)
    count = settings.sessions
    runs = {}
    for vehicles in (10, count):
        runs[vehicles] = await run_fleetprobe(
            scenario(
                broker.url, vehicles // 2, 1, settings.run_s, every_s=2.0, sessions="per_vehicle"
            ),
            workdir / f"sessions-{vehicles}",
        )
    many, few = runs[count], runs[10]
    return {
        **connect,
        "follow_rate": many.sent_per_s,
        "lag_p99_ms": many.lag_p99_ms,
        "ok_ratio": many.ok_ratio,
        "peak_rss_bytes": many.peak_rss_bytes,
        "bytes_per_vehicle": (many.peak_rss_bytes - few.peak_rss_bytes) / (count - 10),
    }


def _sessions_alone(broker: MosquittoProcess, settings: Settings) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _SESSIONS_PROBE,
            broker.host,
            str(broker.port),
            str(settings.sessions),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    connect_s, per_vehicle = (float(v) for v in out.stdout.split())
    return {"sessions": settings.sessions, "connect_s": connect_s, "bytes_per_session": per_vehicle}


# --------------------------------------------------------------------------


def raise_file_limit() -> None:
    """10,000 sessions need 10,000 descriptors on each side (the broker inherits it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def measure(settings: Settings, only: set[str], workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": {
            "node": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        }
    }
    raise_file_limit()
    with MosquittoProcess() as broker:
        if "clients" in only:
            results["clients"] = await bench_clients(broker, settings)
        saturation = 0
        if "follow" in only:
            results["follow"] = await bench_follow(broker, settings, workdir)
            saturation = results["follow"]["1_hop"]["saturation_rate"]
        if "workers" in only:
            results["workers"] = await bench_workers(broker, settings, workdir)
        if "floor" in only:
            results["floor"] = await bench_floor(broker, settings, workdir, saturation)
        if "lag" in only and saturation:
            results["lag"] = await bench_lag(broker, settings, workdir, saturation)
        if "overload" in only:
            results["overload"] = await bench_overload(
                broker, settings, workdir, saturation or SUSTAINABLE_RATE
            )
        if "sessions" in only:
            results["sessions"] = await bench_sessions(broker, settings, workdir)
    if "memory" in only:
        results["memory"] = bench_memory(settings)
    if "scrape" in only:
        results["scrape"] = bench_scrape()
    if "http" in only:
        results["http"] = await bench_http_observers(settings)
    return results


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [f"fleetprobe benchmarks — {m['cpus']} CPUs, Python {m['python']}, {m['platform']}"]
    if "clients" in results:
        c = results["clients"]
        out.append(
            table(
                "\nbare publish + subscribe, QoS 0 (msg/s)",
                ["client", "msg/s"],
                [[k.removesuffix("_msg_s"), v] for k, v in c.items()],
            )
        )
    follows = [
        (f"follow rate, {hops.replace('_', ' ')}", "", data)
        for hops, data in results.get("follow", {}).items()
    ]
    if "workers" in results:
        data = results["workers"]["1_hop"]
        c_rate = results.get("clients", {}).get("c_clients_msg_s")
        share = f", {data['saturation_rate'] / c_rate:.0%} of the C clients" if c_rate else ""
        follows.append(("follow rate, 1 hop, --workers 2", share, data))
    for title, share, data in follows:
        rows = [
            [
                r["rate"],
                r["sent_per_s"],
                r["lag_p50_ms"],
                r["lag_p99_ms"],
                f"{r['ok_ratio']:.2%}",
                "saturated" if r["lag_p99_ms"] > 10 or r["ok_ratio"] < 1 else "",
            ]
            for r in data["runs"]
        ]
        out.append(
            table(
                f"\n{title} (saturation at {data['saturation_rate']:,}/s{share})",
                ["asked/s", "sent/s", "lag p50 ms", "lag p99 ms", "ok", ""],
                rows,
            )
        )
    if "floor" in results:
        out.append(
            table(
                "\ntiming floor: broker hop / round trip (ms)",
                ["measured by", "p50", "p99", "p99.9"],
                [[k, v["p50"], v["p99"], v["p99.9"]] for k, v in results["floor"].items()],
            )
        )
    if "lag" in results:
        out.append(
            table(
                "\nemission lag at a share of saturation (ms)",
                ["rate", "p50", "p99"],
                [[k, v["p50_ms"], v["p99_ms"]] for k, v in results["lag"].items()],
            )
        )
    if "overload" in results:
        out.append(
            table(
                "\noverload: a healthy broker, objective success_ratio >= 0.99",
                ["rate", "followed", "inconclusive", "not followed", "failed", "exit"],
                [
                    [
                        k,
                        f"{v['followed']:.1%}",
                        f"{v['inconclusive']:.1%}",
                        f"{v['not_followed']:.1%}",
                        v["failed"],
                        v["exit_code"],
                    ]
                    for k, v in results["overload"].items()
                ],
            )
        )
    if "sessions" in results:
        s = results["sessions"]
        out.append(
            table(
                "\nper-vehicle sessions in one process",
                [
                    "sessions",
                    "connect s",
                    "bytes/session",
                    "follow/s",
                    "lag p99 ms",
                    "ok",
                    "bytes/vehicle (run)",
                ],
                [
                    [
                        s["sessions"],
                        s["connect_s"],
                        s["bytes_per_session"],
                        s["follow_rate"],
                        s["lag_p99_ms"],
                        f"{s['ok_ratio']:.2%}",
                        s["bytes_per_vehicle"],
                    ]
                ],
            )
        )
    if "memory" in results:
        mem = results["memory"]
        out.append(
            table(
                "\nmemory per in-flight signal",
                ["signals", "bytes/signal"],
                [[mem["signals_in_flight"], mem["bytes_per_signal"]]],
            )
        )
    if "scrape" in results:
        s = results["scrape"]
        out.append(
            table(
                "\n/metrics, 10 chains x 4 hops",
                ["series", "bytes", "render p50 ms", "max ms"],
                [[s["series"], s["bytes"], s["render_ms_p50"], s["render_ms_max"]]],
            )
        )
    if "http" in results:
        out.append(
            table(
                "\nhttp observers (marks per second)",
                ["observer", "marks", "marks/s"],
                [[k, v["marks"], v["marks_per_s"]] for k, v in results["http"].items()],
            )
        )
    return "\n".join(out)


SECTIONS = (
    "clients",
    "follow",
    "workers",
    "floor",
    "lag",
    "overload",
    "sessions",
    "memory",
    "scrape",
    "http",
)
SUSTAINABLE_RATE = 10_000
"""One process's sustainable rate through one hop (BENCHMARKS.md), when ``follow`` is not
measured in the same run."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    only = set(args.only.split(","))
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    settings = QUICK if args.quick else Settings()
    with tempfile.TemporaryDirectory(prefix="fleetprobe-bench-") as workdir:
        results = asyncio.run(measure(settings, only, Path(workdir)))
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
