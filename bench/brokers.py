"""Broker benchmarks beside each other, in one run.

* ``embedded``: the embedded broker's routing rate (QoS 0, one publisher, one subscriber)
  with 0 and 2,000 idle per-vehicle sessions connected, for this tree and, with
  ``--baseline REV``, for another commit's tree side by side (a git worktree, each in a
  process of its own).
* ``publish``: fleetprobe's own session publishing QoS 0 to Mosquitto, awaiting each
  publish (msg/s), for this tree and the ``--baseline`` tree.
* ``restart``: Mosquitto with persistence restarted 2 s into a 6 s QoS 1 run: signals
  timed out at the broker hop with clean sessions and with ``session: {expiry: 1h}``.
* ``window``: Mosquitto with ``max_inflight_messages 2``, MQTT 3.1.1, 2,000 QoS 2
  publishes: how many arrive with the default window (20) and with ``inflight: 2``.

Run: ``python bench/brokers.py [--only embedded,restart,window] [--baseline HEAD~5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleetprobe.testbed.mosquitto import MosquittoProcess  # noqa: E402
from fleetprobe.transport.mqtt import BrokerTarget, MqttSession  # noqa: E402

SECTIONS = ("embedded", "publish", "restart", "window")
MESSAGES = 20_000
IDLE_SESSIONS = (0, 2_000)
REPEATS = 3

# Run in a process of its own, with the tree to measure first on sys.path: the embedded
# broker and a subscriber and publisher on one loop, and the idle sessions.
_EMBEDDED = """
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
from fleetprobe.testbed.broker import EmbeddedBroker
from fleetprobe.transport.mqtt import BrokerTarget, MqttSession

async def main(idle, messages):
    async with EmbeddedBroker(port=0) as broker:
        target = BrokerTarget("127.0.0.1", broker.port)
        idle_sessions = [MqttSession(target, f"VIN{i:014d}") for i in range(idle)]
        for session in idle_sessions:
            await session.__aenter__()
        async with MqttSession(target) as subscriber, MqttSession(target) as publisher:
            await subscriber.subscribe(["bench/#"], qos=0)
            received = 0
            start = time.perf_counter()

            async def publish():
                for i in range(messages):
                    await publisher.publish(f"bench/{i % 100}", b"x" * 200)
                    if i % 500 == 0:
                        await asyncio.sleep(0)

            sending = asyncio.create_task(publish())
            async with asyncio.timeout(120):
                async for _ in subscriber.messages():
                    received += 1
                    if received == messages:
                        break
            elapsed = time.perf_counter() - start
            await sending
        for session in idle_sessions:
            await session.__aexit__(None, None, None)
    print(json.dumps({"rate": messages / elapsed}))

asyncio.run(main(int(sys.argv[2]), int(sys.argv[3])))
"""


_PUBLISH = """
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
from fleetprobe.transport.mqtt import BrokerTarget, MqttSession

async def main(port, messages):
    async with MqttSession(BrokerTarget("127.0.0.1", port)) as publisher:
        payload = b"x" * 230
        start = time.perf_counter()
        for i in range(messages):
            await publisher.publish("bench/publish", payload)
        elapsed = time.perf_counter() - start
    print(json.dumps({"rate": messages / elapsed}))

asyncio.run(main(int(sys.argv[2]), int(sys.argv[3])))
"""


def bench_publish(baseline: str | None) -> list[list[Any]]:
    with MosquittoProcess() as broker:
        return _in_trees(baseline, _PUBLISH, [[str(broker.port), "200000"]])


def bench_embedded(baseline: str | None) -> list[list[Any]]:
    return _in_trees(baseline, _EMBEDDED, [[str(n), str(MESSAGES)] for n in IDLE_SESSIONS])


def _in_trees(baseline: str | None, script: str, cases: list[list[str]]) -> list[list[Any]]:
    """Run ``script`` (tree, *case) per case in this tree and the baseline's: a row per
    tree, the best rate of ``REPEATS`` runs per case (noise on a shared machine only
    ever slows a run down)."""
    trees = [("this tree", REPO)]
    worktree = None
    if baseline:
        worktree = Path(tempfile.mkdtemp(prefix="fleetprobe-baseline-"))
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), baseline],
            check=True,
            capture_output=True,
        )
        trees.insert(0, (baseline, worktree))
    rows = []
    try:
        for name, tree in trees:
            row: list[Any] = [name]
            for case in cases:
                rates = []
                for _ in range(REPEATS):
                    out = subprocess.run(
                        [sys.executable, "-c", script, str(tree), *case],
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout
                    rates.append(json.loads(out)["rate"])
                row.append(f"{max(rates):,.0f}")
            rows.append(row)
    finally:
        if worktree is not None:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                check=False,
            )
    return rows


def _restart_scenario(url: str, persistent: bool, workdir: Path) -> Path:
    scenario: dict[str, Any] = {
        "name": "restart",
        "duration": "6s",
        "seed": 5,
        "target": {"mqtt": {"url": url, "sessions": "pooled", "pool": 2}},
        "fleet": {
            "vehicles": 100,
            "area": {"lat": 48.78, "lon": 9.18, "radius_km": 5},
            "profiles": [{"name": "car", "signals": {"telemetry": {"every": "100ms"}}}],
        },
        "signals": {
            "telemetry": {
                "topic": "bench/{vin}/telemetry",
                "qos": 1,
                "payload": {"vin": "{vin}", "trace_id": "{trace_id}"},
            }
        },
        "chains": [
            {
                "name": "telemetry",
                "signal": "telemetry",
                "hops": [
                    {"name": "broker", "mqtt": {"topic": "bench/+/telemetry"}, "within": "8s"}
                ],
            }
        ],
        "exporters": {"json": str(workdir / "report.json")},
    }
    if persistent:
        scenario["target"]["mqtt"]["session"] = {"expiry": "1h"}
    path = workdir / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario))
    return path


def bench_restart(repeats: int = 3) -> list[list[Any]]:
    rows = []
    for persistent in [False] * repeats + [True] * repeats:
        with tempfile.TemporaryDirectory(prefix="fleetprobe-restart-") as tmp:
            workdir = Path(tmp)
            broker = MosquittoProcess(persistence_dir=workdir / "state")
            broker.start()
            try:
                run = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fleetprobe",
                        "run",
                        str(_restart_scenario(broker.url, persistent, workdir)),
                    ],
                    cwd=workdir,
                    env={**os.environ, "PYTHONPATH": str(REPO)},
                    stdout=subprocess.DEVNULL,
                    stderr=(workdir / "run.log").open("wb"),
                )
                time.sleep(2.0)  # the restart's place in the run
                broker.stop()
                time.sleep(1.0)  # the outage
                broker.start()
                run.wait(60)
            finally:
                broker.stop()
            if not (workdir / "report.json").exists():
                raise RuntimeError((workdir / "run.log").read_text()[-3000:])
            report = json.loads((workdir / "report.json").read_text())
        chain = report["chains"]["telemetry"]
        results = chain["hops"]["broker"]["results"]
        others = {k: v for k, v in results.items() if v and k not in ("ok", "timeout")}
        rows.append(
            [
                "session: {expiry: 1h}" if persistent else "clean sessions",
                report["signals"]["telemetry"]["sent"],
                chain["followed"],
                results.get("ok", 0),
                results.get("timeout", 0),
                ", ".join(f"{k} {v}" for k, v in others.items()) or "-",
                f"{100 * results.get('timeout', 0) / max(1, chain['followed']):.2f}%",
                report["mqtt"]["fleet"]["resent"],
                report["mqtt"]["observer"]["resumed"],
            ]
        )
    return rows


async def _window(broker: MosquittoProcess, inflight: int | None, count: int) -> int:
    target = BrokerTarget(broker.host, broker.port, protocol="3.1.1", inflight=inflight)
    received: set[str] = set()
    async with MqttSession(target) as subscriber, MqttSession(target) as publisher:
        await subscriber.subscribe(["window/#"], qos=2)
        await asyncio.gather(*(publisher.publish(f"window/{i}", b"x", qos=2) for i in range(count)))

        async def take() -> None:
            async for message in subscriber.messages():
                received.add(message.topic)
                if len(received) == count:
                    return

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(take(), 3)  # what has not arrived 3 s after the last ack
    return len(received)


def bench_window() -> list[list[Any]]:
    rows = []
    with MosquittoProcess(listener_options="max_inflight_messages 2") as broker:
        for inflight in (None, 2):
            arrived = asyncio.run(_window(broker, inflight, 2_000))
            label = "default (20)" if inflight is None else f"inflight: {inflight}"
            rows.append([label, 2_000, arrived])
    return rows


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--baseline", help="also measure the embedded broker at this commit")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        parser.error(f"choose sections from {', '.join(SECTIONS)}")
    if "embedded" in only:
        header = ["tree", *(f"msg/s, {n:,} idle sessions (best of 3)" for n in IDLE_SESSIONS)]
        print(table("Embedded broker routing (QoS 0)", header, bench_embedded(args.baseline)))
    if "publish" in only:
        header = ["tree", "msg/s (best of 3)"]
        print(table("fleetprobe's session publishing QoS 0", header, bench_publish(args.baseline)))
    if "restart" in only:
        header = ["sessions", "sent", "followed", "ok", "timeout", "other", "lost", "resent"]
        header.append("resumed")
        print(table("Mosquitto restarted mid-run (QoS 1)", header, bench_restart()))
    if "window" in only:
        header = ["window", "published", "arrived"]
        print(table("3.1.1 to max_inflight_messages 2 (QoS 2)", header, bench_window()))


if __name__ == "__main__":
    main()
