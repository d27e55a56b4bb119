"""Every output counts a run the same way: the measures of fleetprobe.core.results, defined
once, in traces.jsonl, report.json, /metrics, the objectives and the recording rule."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    REPO,
    mqtt_hops_of_the_testbed,
    read_traces,
    run_scenario_dict,
    scenario_dict,
)
from fleetprobe.app.objectives import evaluate
from fleetprobe.app.run import RunOptions
from fleetprobe.app.scenario.models import ObjectiveConfig
from fleetprobe.core.results import (
    HOP_FAILED,
    HOP_OK,
    SKIPPED,
    FollowedSignal,
    HopResult,
    Verdict,
    chain_success_ratio,
    hop_success_ratio,
)
from fleetprobe.exporters.results import ResultBook
from fleetprobe.probes.chains import ChainSpec, HopSpec
from fleetprobe.testbed.knobs import StageKnobs
from fleetprobe.testbed.platform import Testbed
from fleetprobe.testbed.topics import TestbedTopics
from fleetprobe.transport.mqtt import BrokerTarget

RULES = REPO / "deploy" / "prometheus" / "fleetprobe-rules.yml"


def test_a_hop_counts_ok_and_superseded_as_ok_and_leaves_skipped_out() -> None:
    """ok / (ok + failed) at a hop; skipped and pending are no sample of it."""
    assert {"ok", "superseded"} == HOP_OK
    assert {"timeout", "invalid", "out_of_order"} == HOP_FAILED
    results = {"ok": 6, "superseded": 2, "timeout": 1, "invalid": 1, SKIPPED: 40}
    assert hop_success_ratio(results) == 0.8
    assert hop_success_ratio({SKIPPED: 3}) is None


def test_a_chain_counts_unsent_signals_against_it() -> None:
    """ok / (ok + failed + unsent): a signal the platform did not take failed the chain."""
    assert chain_success_ratio(90, 5, 5) == 0.9
    assert chain_success_ratio(0, 0, 0) is None


def test_a_failure_after_the_first_is_counted_skipped() -> None:
    """The chain breaks at its first failing hop; later failures are counted skipped."""
    followed = FollowedSignal(0, 3, "a" * 32, "t", "VIN", 0, 1, 1, None)
    followed.results = [HopResult.OK, HopResult.TIMEOUT, HopResult.TIMEOUT]
    followed.verdict, followed.failed_hop = Verdict.FAILED, 1
    assert [followed.counted_result(h) for h in range(3)] == ["ok", "timeout", SKIPPED]


def book_with(ok: int, failed: int, unsent: int) -> ResultBook:
    """A book of one one-hop chain with these verdicts and unsent signals."""
    chain = ChainSpec("telemetry", "telemetry", (HopSpec("broker", 1.0),))
    book = ResultBook(["telemetry"], [chain])
    for n in range(ok + failed):
        followed = FollowedSignal(0, 1, f"{n:032x}", "telemetry", "VIN", 0, 1, 1, None)
        followed.seen_ns = [2] if n < ok else [0]
        followed.results = [HopResult.OK if n < ok else HopResult.TIMEOUT]
        followed.verdict = Verdict.OK if n < ok else Verdict.FAILED
        followed.failed_hop = None if n < ok else 0
        book.verdict(followed)
    book.not_sent("telemetry", "disconnected", [0] * unsent)
    return book


@pytest.mark.needs_tool("promtool", "prometheus")
def test_the_objective_and_the_recording_rule_compute_one_success_ratio(
    tmp_path: Path,
) -> None:
    """With unsent signals, the ratio the objectives judge is the one the shipped recording
    rule computes from the exported counters (promtool test rules)."""
    ok, failed, unsent = 85, 5, 10
    objective = ObjectiveConfig.model_validate({"chain": "telemetry", "success_ratio": 0.99})
    (judged,) = evaluate([objective], book_with(ok, failed, unsent))
    assert judged.measured == 0.85
    series = 'fleetprobe_chain_results_total{scenario="s",chain="telemetry",result="%s"}'
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": series % result, "values": f"0+{per_minute}x15"}
                    for result, per_minute in (("ok", ok), ("failed", failed), ("unsent", unsent))
                ],
                "promql_expr_test": [
                    {
                        "expr": "round(scenario_chain:fleetprobe_chain_success:ratio_rate5m,"
                        " 0.0001)",
                        "eval_time": "10m",
                        "exp_samples": [
                            {"labels": '{scenario="s",chain="telemetry"}', "value": judged.measured}
                        ],
                    }
                ],
            }
        ],
    }
    test_file = tmp_path / "measures.test.yml"
    test_file.write_text(json.dumps(tests))  # JSON is YAML
    verdict = subprocess.run(
        ["promtool", "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr


def hop_results_in_exposition(exposition: str, chain: str) -> dict[str, Counter[str]]:
    """``fleetprobe_hop_results_total`` of ``chain`` by hop and result, zeros left out."""
    counts: dict[str, Counter[str]] = {}
    for family in text_string_to_metric_families(exposition):
        if family.name != "fleetprobe_hop_results":
            continue
        for sample in family.samples:
            ours = sample.name.endswith("_total") and sample.labels["chain"] == chain
            if ours and sample.value:
                hop = counts.setdefault(sample.labels["hop"], Counter())
                hop[sample.labels["result"]] = int(sample.value)
    return counts


async def test_traces_report_and_metrics_count_every_hop_alike_with_a_20pct_drop(
    tmp_path: Path, broker_url: str, broker: BrokerTarget, prefix: str
) -> None:
    """A gateway that drops 20%: per hop, the results of traces.jsonl, report.json and
    /metrics are identical, and the processor's hop behind it is `skipped` in all three."""
    scenario = scenario_dict(
        broker_url,
        prefix,
        chains=[
            {"name": "platform", "signal": "telemetry", "hops": mqtt_hops_of_the_testbed(prefix)}
        ],
        exporters={"json": str(tmp_path / "report.json"), "traces": str(tmp_path / "traces.jsonl")},
    )
    registry = CollectorRegistry()
    knobs = {"gateway": StageKnobs(drop_ratio=0.2, seed=5)}
    async with Testbed(broker, topics=TestbedTopics.under(prefix), knobs=knobs, seed=3):
        result = await run_scenario_dict(
            tmp_path, scenario, options=RunOptions(handle_signals=False, registry=registry)
        )
    exposition = generate_latest(registry).decode()

    from_traces: dict[str, Counter[str]] = {}
    for line in read_traces(tmp_path):
        for hop, entry in line["hops"].items():
            from_traces.setdefault(hop, Counter())[entry["result"]] += 1
            if entry["result"] == SKIPPED:
                assert entry["own_result"] == "timeout"  # what the hop saw itself
    hops = json.loads((tmp_path / "report.json").read_text())["chains"]["platform"]["hops"]
    from_report = {
        hop: Counter({r: n for r, n in entry["results"].items() if n})
        for hop, entry in hops.items()
    }
    from_metrics = hop_results_in_exposition(exposition, "platform")

    assert from_traces == from_report == from_metrics
    assert from_traces["gateway"]["timeout"] > 0
    assert from_traces["processor"][SKIPPED] == from_traces["gateway"]["timeout"]
    assert "timeout" not in from_traces["processor"]
    assert result.report["chains"]["platform"]["failed_at"] == {
        "gateway": from_traces["gateway"]["timeout"]
    }
