"""What the prober's own limits hide is inconclusive, never a failure of the platform: the
objectives at both ends of what is unknown, exit 4, JUnit errors, and real runs of a
stalled and of an overloaded prober."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import run_scenario_dict, scenario_dict, write_scenario
from fleetprobe.app.exit_codes import ExitCode
from fleetprobe.app.objectives import evaluate
from fleetprobe.app.run import RunOptions, run_scenario
from fleetprobe.app.scenario import load_scenario
from fleetprobe.app.scenario.models import ObjectiveConfig
from fleetprobe.exporters.junit import write_junit
from fleetprobe.exporters.results import ResultBook
from fleetprobe.probes.chains import ChainSpec, HopSpec

CHAIN = ChainSpec("c", "telemetry", (HopSpec("broker", 1.0),))


def book_with(
    ok: int = 0, failed: int = 0, shed: int = 0, latencies: tuple[float, ...] = ()
) -> ResultBook:
    book = ResultBook(["telemetry"], [CHAIN])
    chain = book.chains[0]
    chain.verdicts.update({"ok": ok, "failed": failed})
    chain.hops[0].results.update({"ok": ok, "timeout": failed})
    chain.not_followed["saturated"] = shed
    for latency in latencies:
        chain.latency.add(latency)
        chain.hops[0].latency.add(latency)
    return book


def judge_one(book: ResultBook, **metric: Any) -> Any:
    (outcome,) = evaluate([ObjectiveConfig.model_validate({"chain": "c", **metric})], book)
    return outcome


@pytest.mark.parametrize(
    ("target", "ok", "inconclusive"),
    [(0.9, True, False), (0.95, False, True), (0.999, False, True)],
)
def test_a_ratio_is_judged_at_both_ends_of_what_was_not_followed(
    target: float, ok: bool, inconclusive: bool
) -> None:
    """95 ok, 10 not followed: at worst 95/105 = 0.905, at best 105/105."""
    outcome = judge_one(book_with(ok=95, shed=10), success_ratio=target)
    assert (outcome.ok, outcome.inconclusive) == (ok, inconclusive)
    assert outcome.unjudged == 10 and outcome.measured == 1.0
    assert outcome.bounds == (1.0, pytest.approx(95 / 105))
    if inconclusive:
        assert "inconclusive" in outcome.explanation and "10 signals" in outcome.explanation


def test_a_platform_that_fails_fails_whatever_the_prober_missed() -> None:
    outcome = judge_one(book_with(ok=50, failed=50, shed=5), success_ratio=0.9)
    assert not outcome.ok and not outcome.inconclusive  # at best 55/105


def test_a_latency_read_late_counts_at_most_what_it_shows() -> None:
    """99 exact latencies of 0.1 s and one read late at 0.5 s (at most that)."""
    book = book_with(ok=100, latencies=(0.1,) * 99)
    book.chains[0].latency_late.add(0.5)
    assert judge_one(book, p99="300ms").ok  # even at its worst the late one is the 100th
    met = judge_one(book, max="1s")
    assert met.ok and met.bounds == (0.1, 0.5)
    undecided = judge_one(book, max="300ms")
    assert undecided.inconclusive  # at most 0.5, maybe far less
    failed = judge_one(book, p99="50ms")
    assert not failed.ok and not failed.inconclusive


def test_without_unknowns_an_objective_is_plainly_met_or_failed() -> None:
    outcome = judge_one(book_with(ok=9, failed=1), success_ratio=0.95)
    assert not outcome.ok and not outcome.inconclusive and outcome.bounds is None


def test_junit_marks_an_inconclusive_objective_as_an_error(tmp_path: Path) -> None:
    outcomes = [
        judge_one(book_with(ok=95, shed=10), success_ratio=0.95),
        judge_one(book_with(ok=9, failed=1), success_ratio=0.95),
        judge_one(book_with(ok=10), success_ratio=0.95),
    ]
    write_junit(tmp_path / "junit.xml", "s", outcomes, 1.0)
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    cases = suite.findall("testcase")
    assert cases[0].find("error") is not None and cases[0].find("failure") is None
    assert cases[0].find("error").get("type") == "inconclusive"  # type: ignore[union-attr]
    assert cases[1].find("failure") is not None and cases[1].find("error") is None
    assert cases[2].find("failure") is None and cases[2].find("error") is None


RELAY = """
import asyncio, sys
import aiomqtt

async def main(host, port, source, target):
    async with aiomqtt.Client(host, int(port)) as client:
        await client.subscribe(source)
        print("ready", flush=True)
        async for message in client.messages:
            asyncio.get_running_loop().call_later(
                0.15, asyncio.ensure_future, client.publish(target, message.payload)
            )

asyncio.run(main(*sys.argv[1:]))
"""
"""A platform stage in a process of its own: republishes each message 150 ms later."""


@pytest.fixture
async def relay(broker_url: str, prefix: str) -> AsyncIterator[str]:
    """The relay from the fleet's topic to ``{prefix}/relayed``; yields that topic."""
    host, port = broker_url.removeprefix("mqtt://").split(":")
    source, target = f"{prefix}/vehicles/+/telemetry", f"{prefix}/relayed"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RELAY, host, port, source, target, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(10):
            assert await process.stdout.readline() == b"ready\n"
        yield target
    finally:
        process.kill()
        await process.wait()


async def test_a_stalled_prober_fails_no_hop(
    tmp_path: Path, broker_url: str, prefix: str, relay: str
) -> None:
    """The prober's loop is held up for 0.6 s mid-run, while a platform stage in another
    process goes on delivering in time: what was read late, past its 300 ms deadline, is
    inconclusive, never a timeout, and the report says the prober was blind."""
    scenario = scenario_dict(broker_url, prefix, duration="2s")
    scenario["chains"][0]["hops"][0]["within"] = "300ms"
    scenario["chains"][0]["hops"].append(
        {"name": "relay", "mqtt": {"topic": relay}, "within": "300ms"}
    )
    scenario["exporters"] = {"traces": str(tmp_path / "traces.jsonl")}
    asyncio.get_running_loop().call_later(1.0, time.sleep, 0.6)
    result = await run_scenario_dict(tmp_path, scenario)
    chain = result.report["chains"]["telemetry"]
    assert chain["failed"] == 0, chain
    assert chain["inconclusive"] > 0 and chain["ok"] > 0
    assert result.report["prober"]["blind"]["stall"]["spans"] >= 1
    assert "loop_stall" in result.report["prober"]["limits_hit"]
    assert result.exit_code == ExitCode.OK  # no objective to be undecided


def overloaded(broker_url: str, prefix: str, *hops: dict[str, Any]) -> dict[str, Any]:
    """100,000 signals/s from one process for half a second: far above what any machine
    follows in one process (one MQTT hop sustains ~10,000/s on two cores)."""
    scenario = scenario_dict(broker_url, prefix, duration="500ms")
    scenario["fleet"]["vehicles"] = 500
    scenario["fleet"]["profiles"][0]["signals"]["telemetry"]["every"] = "5ms"
    scenario["target"]["mqtt"]["pool"] = 4
    scenario["chains"][0]["hops"][0]["within"] = "2s"
    scenario["chains"][0]["hops"].extend(hops)
    scenario["slo"] = [{"chain": "telemetry", "success_ratio": 0.99}]
    return scenario


async def run_overloaded(tmp_path: Path, scenario: dict[str, Any]) -> Any:
    scenario["exporters"] = {"junit": str(tmp_path / "junit.xml")}
    loaded = load_scenario(write_scenario(tmp_path / "scenario.yaml", scenario))
    async with asyncio.timeout(120):
        return await run_scenario(loaded, RunOptions(handle_signals=False))


async def test_an_overloaded_prober_is_inconclusive_and_blames_no_hop(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    result = await run_overloaded(tmp_path, overloaded(broker_url, prefix))
    report = result.report
    chain = report["chains"]["telemetry"]
    sent = report["signals"]["telemetry"]["sent"]

    assert result.exit_code == ExitCode.INCONCLUSIVE == report["exit_code"] == 4
    assert chain["failed"] == 0 and chain["hops"]["broker"]["results"]["timeout"] == 0
    shed = chain["not_followed"]["saturated"]
    assert shed > 0 and chain["followed"] + shed == sent
    assert report["prober"]["saturated"] and report["prober"]["windows_saturated"] >= 1
    (objective,) = report["objectives"]
    assert objective["inconclusive"] and objective["unjudged"] >= shed
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert suite is not None and (suite.get("errors"), suite.get("failures")) == ("1", "0")


async def test_an_overloaded_prober_still_fails_a_platform_that_fails(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """A hop nobody publishes to: what the prober did follow fails there, conclusively."""
    never = {"name": "never", "mqtt": {"topic": f"{prefix}/never/+"}, "within": "2s"}
    result = await run_overloaded(tmp_path, overloaded(broker_url, prefix, never))
    chain = result.report["chains"]["telemetry"]
    assert result.exit_code == ExitCode.OBJECTIVE_FAILED
    assert chain["failed"] > 0 and chain["failed_at"] == {"never": chain["failed"]}
