"""Shards as processes: `--shard I/N` processes and `--workers N` against one Mosquitto.

The union of the shards must be the unsharded run, signal for signal, and `--workers`
must give one report, one trace log and one /metrics for the whole fleet.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from junitparser import JUnitXml
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    assert_promtool_accepts,
    finish,
    fleetprobe,
    read_traces,
    run_scenario_dict,
    scenario_dict,
    scrape_until,
    write_scenario,
)
from fleetprobe.app.run import RunOptions
from fleetprobe.app.scenario.models import Scenario
from fleetprobe.app.workers import unshardable_parts
from fleetprobe.simulator.fleet import shard_of
from fleetprobe.testbed.mosquitto import free_port
from fleetprobe.transport.mqtt import BrokerTarget, MqttSession


def small_fleet(
    broker_url: str, prefix: str, out: Path = Path("."), **overrides: Any
) -> dict[str, Any]:
    """60 vehicles at 5 signals/s each for 3 s, with every report written into ``out``."""
    scenario = scenario_dict(broker_url, prefix, **{"duration": "3s", **overrides})
    scenario["fleet"]["vehicles"] = 60
    scenario["slo"] = [{"chain": "telemetry", "success_ratio": 0.9, "p99": "400ms"}]
    scenario["exporters"] = {
        "json": str(out / "report.json"),
        "junit": str(out / "junit.xml"),
        "traces": str(out / "traces.jsonl"),
    }
    return scenario


RUN_ID = "shards-1"
"""Shards and the whole fleet compared signal for signal: one run id, so one set of trace ids."""
SAME_RUN = RunOptions(handle_signals=False, run_id=RUN_ID)


def trace_ids(lines: list[dict[str, Any]]) -> set[str]:
    return {line["trace_id"] for line in lines}


async def test_three_shard_processes_equal_the_unsharded_run_signal_for_signal(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """`--shard 0/3`, `1/3` and `2/3` at once on one broker: together exactly the unsharded
    run's signals (same trace ids), each followed by its own shard, none counted twice."""
    whole_dir, shard_dirs = tmp_path / "whole", [tmp_path / f"shard{i}" for i in range(3)]
    for folder in (whole_dir, *shard_dirs):
        folder.mkdir()
    shards_scenario = small_fleet(broker_url, f"{prefix}s")
    path = write_scenario(tmp_path / "shards.yaml", shards_scenario)
    processes = [
        await fleetprobe("run", str(path), "--shard", f"{i}/3", "--run-id", RUN_ID, cwd=folder)
        for i, folder in enumerate(shard_dirs)
    ]
    whole = await run_scenario_dict(
        whole_dir, small_fleet(broker_url, f"{prefix}w", whole_dir), options=SAME_RUN
    )
    ends = await asyncio.gather(*(finish(p, 60) for p in processes))

    assert [code for code, _, _ in ends] == [0, 0, 0], [err for _, _, err in ends]
    shard_ids = [trace_ids(read_traces(folder)) for folder in shard_dirs]
    assert all(shard_ids)
    assert sum(len(ids) for ids in shard_ids) == len(set().union(*shard_ids))  # disjoint
    assert set().union(*shard_ids) == trace_ids(read_traces(whole_dir))
    reports = [json.loads((folder / "report.json").read_text()) for folder in shard_dirs]
    sent = sum(r["signals"]["telemetry"]["sent"] for r in reports)
    assert sent == whole.report["signals"]["telemetry"]["sent"] == len(set().union(*shard_ids))
    for report in reports:  # each saw the others' messages and counted none of them
        hop = report["chains"]["telemetry"]["hops"]["broker"]
        assert hop["unmatched"] == {} and hop["duplicates"] == 0
        assert report["chains"]["telemetry"]["ok"] == report["signals"]["telemetry"]["sent"]


async def test_workers_give_one_report_trace_log_and_junit_for_the_whole_fleet(
    tmp_path: Path, broker: BrokerTarget, broker_url: str, prefix: str
) -> None:
    """`--workers 2`: the merged report, trace log and junit.xml equal the unsharded run's
    counts, objectives judged once on all signals; the workers' shards are listed. A
    message without a trace id, which both workers see, is counted once."""
    (tmp_path / "whole").mkdir()
    path = write_scenario(tmp_path / "s.yaml", small_fleet(broker_url, f"{prefix}m"))
    process = await fleetprobe("run", str(path), "--workers", "2", "--run-id", RUN_ID, cwd=tmp_path)
    async with MqttSession(broker) as platform:
        await platform.subscribe([f"{prefix}m/vehicles/+/telemetry"])
        senders: set[int] = set()
        async with asyncio.timeout(30):
            async for message in platform.messages():  # until both shards' fleets send:
                senders.add(shard_of(message.topic.split("/")[2], 2))  # both follow by then
                if len(senders) == 2:
                    break
        await platform.publish(f"{prefix}m/vehicles/X/telemetry", b"garbage", qos=1)
    whole_dir = tmp_path / "whole"
    whole = await run_scenario_dict(
        whole_dir, small_fleet(broker_url, f"{prefix}w", whole_dir), options=SAME_RUN
    )
    code, out, err = await finish(process, 60)

    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    lines = read_traces(tmp_path)
    chain = report["chains"]["telemetry"]
    sent = report["signals"]["telemetry"]["sent"]
    assert sent == whole.report["signals"]["telemetry"]["sent"] == len(lines) == chain["ok"]
    assert trace_ids(lines) == trace_ids(read_traces(whole_dir))
    assert chain["hops"]["broker"]["unmatched"] == {"not_json": 1}
    assert [w["shard"] for w in report["workers"]] == ["shard 0/2", "shard 1/2"]
    assert all(w["exit_code"] == 0 and w["results"] for w in report["workers"])
    assert [o["metric"] for o in report["objectives"]] == ["success_ratio", "p99"]
    cases = [
        case.name for suite in JUnitXml.fromfile(str(tmp_path / "junit.xml")) for case in suite
    ]
    assert len(cases) == 2
    assert f"followed {sent}, ok {sent}" in out  # one summary, of the whole fleet
    assert "[shard 0/2]" in err and "[shard 1/2]" in err


@pytest.mark.needs_tool("promtool", "prometheus")
async def test_workers_serve_one_merged_metrics_endpoint(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """Mid-run merged /metrics passes promtool, shared gauges undoubled; SIGTERM ends all."""
    port = free_port()
    scenario = small_fleet(broker_url, prefix, duration="30s")
    scenario["exporters"]["prometheus"] = {"listen": f"127.0.0.1:{port}"}
    path = write_scenario(tmp_path / "s.yaml", scenario)
    process = await fleetprobe("run", str(path), "--workers", "2", cwd=tmp_path)
    text = await scrape_until(
        port, lambda t: 'fleetprobe_hop_up{chain="telemetry"' in t and _sent(t) >= 300
    )
    process.send_signal(signal.SIGTERM)
    code, _, err = await finish(process, 30)
    report = json.loads((tmp_path / "report.json").read_text())

    assert code == 143, err
    assert report["interrupted"] is True and report["exit_code"] == 143
    assert report["signals"]["telemetry"]["sent"] == len(read_traces(tmp_path)) >= _sent(text)
    assert 'fleetprobe_hop_up{chain="telemetry",hop="broker",scenario="test"} 1.0' in text
    assert 'hop="",metric="success_ratio",scenario="test"} 0.9' in text
    await assert_promtool_accepts(text)


# The merged counters and histogram counts a shard's trace log accounts for, one by one.
COUNTED = (
    "fleetprobe_signals_sent_total",
    "fleetprobe_hop_results_total",
    "fleetprobe_chain_results_total",
    "fleetprobe_hop_latency_seconds_count",
    "fleetprobe_chain_latency_seconds_count",
    "fleetprobe_duplicates_total",
)
Sample = tuple[str, frozenset[tuple[str, str]]]


async def test_workers_merged_metrics_count_what_every_shard_counted(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """After the run, every merged counter is the sum of both shards' counts, per label set."""
    # Scraped in the linger, after the reports: the workers' final counts. Each shard's own
    # counts are its signals' lines in the joined trace log (signals sent, hop results by
    # result, chain results, latency counts); report.json, merged from the shards' books,
    # agrees. Both shards send both signals, so one worker's counters alone cannot pass.
    port = free_port()
    scenario = small_fleet(broker_url, prefix, tmp_path, duration="2s")
    del scenario["slo"]  # judged elsewhere; here only the counts matter
    scenario["fleet"]["profiles"][0]["signals"]["door"] = {"every": "500ms"}
    scenario["signals"]["door"] = {
        "topic": f"{prefix}/vehicles/{{vin}}/door",
        "qos": 0,
        "payload": {"vin": "{vin}", "trace_id": "{trace_id}"},
    }
    scenario["chains"].append(
        {
            "name": "door",
            "signal": "door",
            "hops": [
                {
                    "name": "broker",
                    "mqtt": {"topic": f"{prefix}/vehicles/+/door"},
                    "within": "500ms",
                },
                # Nothing publishes there: every door chain fails at this hop.
                {"name": "never", "mqtt": {"topic": f"{prefix}/never/+"}, "within": "500ms"},
            ],
        }
    )
    scenario["exporters"]["prometheus"] = {"listen": f"127.0.0.1:{port}", "linger": "60s"}
    path = write_scenario(tmp_path / "s.yaml", scenario)
    process = await fleetprobe("run", str(path), "--workers", "2", cwd=tmp_path)
    assert process.stderr is not None
    logged = []
    async with asyncio.timeout(60):  # until the reports are written: the counts are final
        while "reports written" not in (line := (await process.stderr.readline()).decode()):
            assert line, f"fleetprobe ended before its linger: {''.join(logged)}"
            logged.append(line)
    final = await scrape_until(port, lambda _: True)
    process.send_signal(signal.SIGTERM)  # ends the linger
    code, _, err = await finish(process, 30)
    report = json.loads((tmp_path / "report.json").read_text())

    assert code == 0, "".join(logged) + err
    shards = [Counter[Sample](), Counter[Sample]()]
    for line in read_traces(tmp_path):
        _count_trace_line(shards[shard_of(line["vin"], 2)], line)
    merged = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(final)
        for sample in family.samples
        if sample.name in COUNTED and sample.value
    }
    assert merged == shards[0] + shards[1]
    assert {name for name, _ in merged} >= set(COUNTED) - {"fleetprobe_duplicates_total"}
    # Each shard sent both signals and saw every door chain fail at `never`.
    for key in merged:
        if key[0] == "fleetprobe_signals_sent_total" or ("failed_hop", "never") in key[1]:
            assert shards[0][key] > 0 and shards[1][key] > 0, key
    for name, chain in report["chains"].items():  # report.json, merged from the shards' books
        results = Counter[str]()
        for (sample, labels), value in merged.items():
            if sample == "fleetprobe_chain_results_total" and ("chain", name) in labels:
                results[dict(labels)["result"]] += int(value)
        counted = ("ok", "failed", "aborted", "inconclusive", "unsent")
        assert results == {r: chain[r] for r in counted if chain[r]}


def _count_trace_line(counts: Counter[Sample], line: dict[str, Any]) -> None:
    """Add what the metrics of its shard counted for the signal of one trace line."""

    def count(name: str, **labels: str) -> None:
        counts[name, frozenset({"scenario": "test", **labels}.items())] += 1

    chain = line["chain"]
    count("fleetprobe_signals_sent_total", signal=line["signal"])
    count(
        "fleetprobe_chain_results_total",
        chain=chain,
        result=line["verdict"],
        failed_hop=line["failed_hop"] or "",
    )
    # A latency read while the prober was blind is not exact: no histogram counts it.
    blind = any(seen.get("prober_blind") for seen in line["hops"].values())
    if line["verdict"] == "ok" and not blind:
        count("fleetprobe_chain_latency_seconds_count", chain=chain)
    for hop, seen in line["hops"].items():
        if seen["result"] != "pending":  # an aborted signal's unjudged hop is not counted
            count("fleetprobe_hop_results_total", chain=chain, hop=hop, result=seen["result"])
        if seen["result"] == "ok" and not seen.get("prober_blind"):
            count("fleetprobe_hop_latency_seconds_count", chain=chain, hop=hop)
        for _ in range(seen.get("duplicates", 0)):
            count("fleetprobe_duplicates_total", chain=chain, hop=hop)


def _sent(exposition: str) -> float:
    prefix = 'fleetprobe_signals_sent_total{scenario="test",signal="telemetry"} '
    for line in exposition.splitlines():
        if line.startswith(prefix):
            return float(line.removeprefix(prefix))
    return 0.0


async def test_workers_refuse_what_shards_cannot_share_before_anything_starts(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """A webhook hop needs one receiver for all shards: exit 2 naming the hop, no worker."""
    scenario = small_fleet(broker_url, prefix)
    scenario["chains"][0]["hops"].append(
        {"name": "hook", "webhook": {"path": "/hooks/t"}, "within": "1s"}
    )
    path = write_scenario(tmp_path / "s.yaml", scenario)
    code, _, err = await finish(await fleetprobe("run", str(path), "--workers", "2", cwd=tmp_path))
    assert code == 2
    assert "--workers 2 cannot run webhook hop telemetry > hook" in err
    assert "worker processes started" not in err
    assert not (tmp_path / "report.json").exists()


def test_workers_refuse_a_rotated_trace_log_but_not_a_sampled_one() -> None:
    """Each shard would rotate its own file: refused, named; sampling shards well."""
    scenario = small_fleet("mqtt://127.0.0.1:1883", "p")
    scenario["exporters"] = {"traces": {"path": "t.jsonl", "sample_ok": 0.1}}
    assert unshardable_parts(Scenario.model_validate(scenario)) == []
    scenario["exporters"]["traces"]["max_size"] = "1MB"
    [part] = unshardable_parts(Scenario.model_validate(scenario))
    assert part.startswith("a rotated trace log")
