"""The trace log kept to a size for long runs: every signal that is not ok is written, ok
ones by a share; the file rotates between lines, keeping N; a file moved away (logrotate)
is opened anew. What was and was not written is counted on /metrics."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from conftest import REPO, run_scenario_dict, scenario_dict, write_scenario
from fleetprobe.app.run import RunOptions, run_scenario
from fleetprobe.app.scenario import ScenarioError, load_scenario
from fleetprobe.core.results import FollowedSignal, HopResult, Verdict
from fleetprobe.exporters.traces import TraceLog, TracePolicy
from fleetprobe.probes.chains import ChainSpec, HopSpec
from fleetprobe.transport.mqtt import BrokerTarget, MqttSession, parse_broker_url


def two_chains(broker_url: str, prefix: str, traces: Any, duration: str = "2s") -> dict[str, Any]:
    """One signal followed by a chain that is ok (the broker) and one that fails (a hop
    nobody publishes to): ok and failed lines side by side."""
    scenario = scenario_dict(broker_url, prefix, duration=duration)
    ok_chain = scenario["chains"][0]
    scenario["chains"] = [
        ok_chain,
        {
            "name": "broken",
            "signal": "telemetry",
            "hops": [
                *ok_chain["hops"],
                {"name": "nowhere", "within": "600ms", "mqtt": {"topic": f"{prefix}/nowhere/+"}},
            ],
        },
    ]
    scenario["exporters"] = {"traces": traces}
    return scenario


def lines_of(*paths: Path) -> list[dict[str, Any]]:
    """Every line of these files, each parsed whole (a split line would not parse)."""
    return [json.loads(line) for path in paths for line in path.read_text().splitlines()]


def lines_metric(registry: CollectorRegistry, outcome: str) -> float:
    value = registry.get_sample_value(
        "fleetprobe_trace_lines_total", {"scenario": "test", "outcome": outcome}
    )
    return value or 0.0


async def test_the_log_rotates_between_lines_and_keeps_every_line(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """``max_size: 8KiB``: traces.jsonl, .1, .2, ... each whole lines, none lost (keep is
    large enough to hold them all), each at most the size and one line more."""
    path = tmp_path / "traces.jsonl"
    traces = {"path": str(path), "max_size": "8KiB", "keep": 200}
    registry = CollectorRegistry()
    options = RunOptions(handle_signals=False, registry=registry)
    result = await run_scenario_dict(tmp_path, two_chains(broker_url, prefix, traces), 90, options)
    rotated = sorted(path.parent.glob("traces.jsonl.*"), key=lambda p: int(p.suffix[1:]))
    assert len(rotated) >= 2
    lines = lines_of(*reversed(rotated), path)
    chains = result.report["chains"]
    assert len(lines) == chains["telemetry"]["followed"] + chains["broken"]["followed"]
    assert lines_metric(registry, "written") == len(lines)
    assert sum(line["verdict"] == "failed" for line in lines) == chains["broken"]["failed"] > 0
    for older in rotated:
        assert 8192 <= older.stat().st_size <= 8192 + 2048


async def test_ok_signals_are_sampled_and_every_other_one_is_kept(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """``sample_ok: 0.1``: every failed signal has its line; about a tenth of the ok ones
    do; written + sampled out = followed, on /metrics too; a replay writes the same lines."""
    traces = {"path": str(tmp_path / "traces.jsonl"), "sample_ok": 0.1}
    registry = CollectorRegistry()
    options = RunOptions(handle_signals=False, registry=registry)
    result = await run_scenario_dict(tmp_path, two_chains(broker_url, prefix, traces), 90, options)
    lines = lines_of(tmp_path / "traces.jsonl")
    chains = result.report["chains"]
    ok_lines = [line for line in lines if line["verdict"] == "ok"]
    failed_lines = [line for line in lines if line["verdict"] == "failed"]
    assert len(failed_lines) == chains["broken"]["failed"] > 0
    assert 0 < len(ok_lines) < chains["telemetry"]["ok"] / 3
    followed = chains["telemetry"]["followed"] + chains["broken"]["followed"]
    assert lines_metric(registry, "written") + lines_metric(registry, "sampled_out") == followed
    assert lines_metric(registry, "written") == len(lines)


async def test_a_log_moved_away_mid_run_is_opened_anew(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """logrotate renames traces.jsonl: within a second the log writes a new one; the moved
    file and the new one hold every line between them."""
    path = tmp_path / "traces.jsonl"
    scenario = two_chains(broker_url, prefix, str(path), duration="4s")
    loaded = load_scenario(write_scenario(tmp_path / "s.yaml", scenario))
    run = asyncio.create_task(run_scenario(loaded, RunOptions(handle_signals=False)))
    host, port, _ = parse_broker_url(broker_url)
    async with MqttSession(BrokerTarget(host, port)) as watcher, asyncio.timeout(20):
        await watcher.subscribe([f"{prefix}/#"])
        await anext(aiter(watcher.messages()))  # emitting: the log is open
    while not path.exists():  # noqa: ASYNC110 (polling a file: there is nothing to await)
        await asyncio.sleep(0.05)
    path.rename(tmp_path / "moved.jsonl")
    async with asyncio.timeout(60):
        result = await run
    chains = result.report["chains"]
    lines = lines_of(tmp_path / "moved.jsonl", path)
    assert len(lines) == chains["telemetry"]["followed"] + chains["broken"]["followed"]
    assert lines_of(path)  # the new file took the later lines


@pytest.mark.parametrize(
    ("size", "problem"),
    [("1KB", "must be >= 4096"), ("ten", "a size is a number and a unit")],
)
def test_a_bad_size_is_named(tmp_path: Path, size: str, problem: str) -> None:
    scenario = two_chains("mqtt://127.0.0.1:1883", "p", {"path": "t.jsonl", "max_size": size})
    with pytest.raises(ScenarioError, match=rf"exporters > traces > log > max_size: .*{problem}"):
        load_scenario(write_scenario(tmp_path / "s.yaml", scenario))


CHAIN = ChainSpec("c", "telemetry", (HopSpec("broker", 1.0),))


def retired_signal(verdict: Verdict = Verdict.FAILED) -> FollowedSignal:
    """A followed signal of CHAIN, judged ``verdict``."""
    now = time.time_ns()
    followed = FollowedSignal(0, 1, secrets.token_hex(16), "telemetry", "VIN1", 0, 0, now, None)
    followed.results[0] = HopResult.OK if verdict is Verdict.OK else HopResult.TIMEOUT
    followed.verdict = verdict
    followed.failed_hop = None if verdict is Verdict.OK else 0
    return followed


def test_a_file_truncated_in_place_is_written_on_from_its_new_end(tmp_path: Path) -> None:
    """logrotate's copytruncate: the next lines go to the start of the emptied file, not
    after a run of NUL bytes where the old end was."""
    path = tmp_path / "t.jsonl"
    trace_log = TraceLog(path, [CHAIN], "run")
    trace_log.open()
    for _ in range(50):
        trace_log.retired(retired_signal())
    trace_log._flush()
    os.truncate(path, 0)  # what copytruncate does after copying
    trace_log.retired(retired_signal())
    trace_log.close()
    data = path.read_bytes()
    assert b"\x00" not in data and len(lines_of(path)) == 1


def test_a_full_disk_loses_whole_lines_only_and_counts_them(tmp_path: Path) -> None:
    """A write that does not fit (a file size limit, as a full disk) is cut back to the last
    whole line: every line is written or counted lost, none is half there."""
    script = f"""
import json, resource, secrets, signal, sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_trace_log import CHAIN, retired_signal
from fleetprobe.exporters.traces import TraceLog
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
log = TraceLog({str(tmp_path / "t.jsonl")!r}, [CHAIN], "run")
log.open()
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
for _ in range(2000):
    log.retired(retired_signal())
log.close()
print(json.dumps({{"written": log.written, "lost": log.lost, "error": log.error}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    counts = json.loads(done.stdout.splitlines()[-1])
    data = (tmp_path / "t.jsonl").read_bytes()
    assert counts["error"] and counts["written"] + counts["lost"] == 2000
    assert data.endswith(b"\n") and len(lines_of(tmp_path / "t.jsonl")) == counts["written"]


def test_rotated_files_of_an_earlier_run_go_but_other_files_stay(tmp_path: Path) -> None:
    """With ``max_size`` the numbered files beside the log are its own: an earlier run's
    go, whatever its ``keep`` was. Without it they are someone else's (logrotate's) and
    stay."""
    path = tmp_path / "t.jsonl"
    for name in ("t.jsonl.1", "t.jsonl.9", "t.jsonl.2.gz", "t.jsonl.old"):
        (tmp_path / name).write_text("earlier\n")
    TraceLog(path, [CHAIN], "run").open()
    assert (tmp_path / "t.jsonl.1").exists() and (tmp_path / "t.jsonl.9").exists()
    TraceLog(path, [CHAIN], "run", TracePolicy(max_bytes=1 << 20, keep=3)).open()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["t.jsonl", "t.jsonl.2.gz", "t.jsonl.old"]


def test_a_rotated_name_that_is_another_output_is_refused(tmp_path: Path) -> None:
    """``json: t.jsonl.2`` beside a rotated ``traces: t.jsonl``: rotation would replace the
    report; a folder at ``t.jsonl.1`` could not be rotated into. Both named at once."""
    scenario = two_chains("mqtt://127.0.0.1:1883", "p", None)
    scenario["exporters"] = {
        "json": str(tmp_path / "t.jsonl.2"),
        "traces": {"path": str(tmp_path / "t.jsonl"), "max_size": "1MB", "keep": 3},
    }
    (tmp_path / "t.jsonl.1").mkdir()
    with pytest.raises(ScenarioError) as refused:
        load_scenario(write_scenario(tmp_path / "s.yaml", scenario))
    message = str(refused.value)
    assert "t.jsonl.2 (a rotated trace file) is also exporters.json" in message
    assert "t.jsonl.1 (a rotated trace file) is not a regular file" in message
