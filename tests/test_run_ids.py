"""Every run has its id: the same seed and run id replay a run exactly, and two runs of one
seed against one broker never claim each other's signals."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import simpy
from prometheus_client import CollectorRegistry

from conftest import finish, fleetprobe, read_traces, run_scenario_dict, scenario_dict
from fleetprobe.app.run import RunOptions
from fleetprobe.core.trace_ids import new_run_id
from fleetprobe.simulator.fleet import (
    Area,
    Cadence,
    Emission,
    FleetSpec,
    Profile,
    build_fleet,
    shard_of_trace_id,
)

CAR = Profile("car", 1.0, (20.0, 90.0), {"telemetry": Cadence(1.0, 0.2)})


def emissions(run_id: str, seed: int = 7) -> list[Emission]:
    """A minute of 10 vehicles of ``seed`` in run ``run_id``."""
    spec = FleetSpec(seed, 10, Area(48.78, 9.18, 5.0), (CAR,), run_id=run_id)
    env, outbox = simpy.Environment(), []
    for vehicle in build_fleet(spec):
        vehicle.start(env, outbox)
    env.run(until=60)
    return outbox


def test_the_same_seed_and_run_id_replay_a_run_exactly() -> None:
    """Same seed, same run id: the same signals with the same trace ids, field for field."""
    first, again = emissions("ci-1234"), emissions("ci-1234")
    assert len(first) > 500
    assert [(e.t_sim, e.vin, e.trace_id, e.fields) for e in first] == [
        (e.t_sim, e.vin, e.trace_id, e.fields) for e in again
    ]


def test_another_run_id_gives_other_trace_ids_for_the_same_fleet() -> None:
    """Same seed, other run id: the same fleet and schedule, and no trace id in common;
    each id still names its vehicle's shard."""
    first, other = emissions(new_run_id()), emissions(new_run_id())
    assert [(e.t_sim, e.vin) for e in first] == [(e.t_sim, e.vin) for e in other]
    assert {e.trace_id for e in first}.isdisjoint({e.trace_id for e in other})
    for a, b in zip(first, other, strict=True):
        assert shard_of_trace_id(a.trace_id, 4) == shard_of_trace_id(b.trace_id, 4)


def dropping_everything(scenario: dict[str, Any], upstream: str) -> dict[str, Any]:
    """``scenario`` sending through a proxy that drops every PUBLISH for the whole run."""
    scenario["target"]["mqtt"]["via"] = "fleet-broker"
    scenario["faults"] = {
        "proxies": [{"name": "fleet-broker", "upstream": upstream}],
        "timeline": [
            {
                "name": "drop-all",
                "kind": "mqtt_drop",
                "target": "fleet-broker",
                "stream": "upstream",
                "probability": 1.0,
                "at": "0s",
                "for": scenario["duration"],
            }
        ],
    }
    return scenario


async def test_two_runs_of_one_seed_on_one_broker_stay_apart(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """Run A loses every PUBLISH, run B (same seed and topics, at the same time) loses none:
    A fails at the broker hop for every signal, B passes, and neither takes the other's
    messages for its own signals."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()

    def outputs(folder: Path) -> dict[str, Any]:
        scenario = scenario_dict(broker_url, prefix)
        scenario["exporters"] = {
            "json": str(folder / "report.json"),
            "traces": str(folder / "traces.jsonl"),
        }
        return scenario

    run_a = dropping_everything(outputs(a_dir), broker_url.removeprefix("mqtt://"))
    a, b = await asyncio.gather(
        run_scenario_dict(a_dir, run_a), run_scenario_dict(b_dir, outputs(b_dir))
    )
    chain_a, chain_b = a.report["chains"]["telemetry"], b.report["chains"]["telemetry"]
    assert a.report["run_id"] != b.report["run_id"]
    assert chain_a["followed"] > 0 and chain_a["ok"] == 0
    assert chain_a["hops"]["broker"]["results"]["timeout"] == chain_a["followed"]
    assert chain_b["followed"] > 0 and chain_b["ok"] == chain_b["followed"]
    # Each saw the other's messages on the shared topic: ids it does not follow, never ok.
    ids_a = {line["trace_id"] for line in read_traces(a_dir)}
    ids_b = {line["trace_id"] for line in read_traces(b_dir)}
    assert ids_a.isdisjoint(ids_b)
    assert chain_a["hops"]["broker"]["unmatched"].get("unknown_trace_id", 0) > 0
    assert a.exit_code == b.exit_code == 0  # no objectives: the report says where A broke


async def test_the_run_id_is_in_the_report_the_trace_log_and_run_info(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """A given run id is kept: report.json, every trace line, fleetprobe_run_info."""
    scenario = scenario_dict(broker_url, prefix)
    scenario["exporters"] = {
        "json": str(tmp_path / "report.json"),
        "traces": str(tmp_path / "traces.jsonl"),
    }
    registry = CollectorRegistry()
    options = RunOptions(handle_signals=False, registry=registry, run_id="nightly-42")
    result = await run_scenario_dict(tmp_path, scenario, options=options)
    assert json.loads((tmp_path / "report.json").read_text())["run_id"] == "nightly-42"
    lines = read_traces(tmp_path)
    assert lines and {line["run_id"] for line in lines} == {"nightly-42"}
    info = {"scenario": "test", "run_id": "nightly-42"}
    assert registry.get_sample_value("fleetprobe_run_info", info) == 1.0
    assert result.exit_code == 0


async def test_a_malformed_run_id_is_a_usage_error(tmp_path: Path) -> None:
    """`--run-id` with a space or a slash: exit 2 before anything starts, saying why."""
    scenario = tmp_path / "s.yaml"
    scenario.write_text("name: x\n")  # never read: the arguments are refused first
    process = await fleetprobe("run", str(scenario), "--run-id", "a/b c", cwd=tmp_path)
    code, _, err = await finish(process, 30)
    assert code == 2
    assert "'a/b c' is not a run id" in err
