"""A real Mosquitto stopped and started under a run: sessions come back, the run goes on,
every signal still ends in exactly one verdict, and the report names the outage."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from conftest import REPO, assert_every_signal_accounted, read_traces, scenario_dict, write_scenario
from fleetprobe.app.run import RunOptions, RunResult, run_scenario
from fleetprobe.app.scenario import load_scenario
from fleetprobe.simulator.publisher import MqttPublisher
from fleetprobe.testbed.broker import EmbeddedBroker
from fleetprobe.testbed.mosquitto import MosquittoProcess
from fleetprobe.transport.mqtt import BrokerTarget, MqttSession

OUTAGE_S = 1.0
OUTAGE_RUN_S = float(os.environ.get("FLEETPROBE_OUTAGE_RUN_S", "14"))


async def first_messages(target: BrokerTarget, topic_filter: str, count: int) -> None:
    """Return once ``count`` messages matching ``topic_filter`` went through the broker."""
    async with MqttSession(target) as watcher:
        await watcher.subscribe([topic_filter])
        messages = aiter(watcher.messages())
        for _ in range(count):
            await anext(messages)


async def run_through_a_restart(
    broker: MosquittoProcess,
    scenario: dict[str, Any],
    prefix: str,
    tmp_path: Path,
    options: RunOptions,
) -> RunResult:
    """Run ``scenario`` and restart ``broker`` (down for OUTAGE_S) once 20 messages under
    ``prefix`` went through; then stop the broker for good."""
    try:
        loaded = load_scenario(write_scenario(tmp_path / "s.yaml", scenario))
        run = asyncio.create_task(run_scenario(loaded, options))
        async with asyncio.timeout(20):
            await first_messages(BrokerTarget(broker.host, broker.port), f"{prefix}/#", 20)
        await asyncio.to_thread(broker.stop)
        await asyncio.sleep(OUTAGE_S)  # the outage itself, not a wait for something
        await asyncio.to_thread(broker.start)
        async with asyncio.timeout(60):
            return await run
    finally:
        broker.stop()


@pytest.mark.parametrize("persistent", [False, True], ids=["no-persistence", "persistence"])
async def test_a_broker_restart_is_survived_and_reported(
    tmp_path: Path, prefix: str, persistent: bool
) -> None:
    """Fleet and observer reconnect after the broker comes back and the hop is ok again;
    sent = verdicts = trace lines; the outage is in report.json and in the metrics."""
    broker = MosquittoProcess(persistence_dir=tmp_path / "state" if persistent else None)
    broker.start()
    scenario = scenario_dict(broker.url, prefix, duration="5s")
    scenario["exporters"] = {
        "json": str(tmp_path / "report.json"),
        "traces": str(tmp_path / "traces.jsonl"),
    }
    registry = CollectorRegistry()
    options = RunOptions(handle_signals=False, registry=registry)
    result = await run_through_a_restart(broker, scenario, prefix, tmp_path, options)

    report = json.loads((tmp_path / "report.json").read_text())
    lines = read_traces(tmp_path)
    signal = report["signals"]["telemetry"]
    assert result.exit_code == 0  # no objectives: the run itself went on to its end
    assert signal["sent"] > 0
    assert_every_signal_accounted(scenario, report, tmp_path / "traces.jsonl")
    fleet, observer = report["mqtt"]["fleet"], report["mqtt"]["observer"]
    assert fleet["sessions"] == 2 and fleet["reconnects"] == 2
    assert observer["reconnects"] == 1
    for role in (fleet, observer):
        [outage] = role["outages"]
        assert outage["to"] is not None and outage["duration_s"] >= OUTAGE_S * 0.9
    for role, sessions, reconnects in (("fleet", 2, 2), ("observer", 1, 1)):
        labels = {"scenario": "test", "role": role}
        assert registry.get_sample_value("fleetprobe_mqtt_connected", labels) == sessions
        assert registry.get_sample_value("fleetprobe_mqtt_reconnects_total", labels) == reconnects
    # After the restart the chain works again: the last signals were seen at the broker.
    last = sorted(lines, key=lambda line: line["sent_at"])[-20:]
    assert all(line["hops"]["broker"]["result"] == "ok" for line in last)


@pytest.mark.parametrize(
    ("which", "given_up_as"),
    [("mosquitto", "unknown"), ("embedded", "duplicate_client_id")],
    ids=["silent-takeover", "announced-takeover"],
)
async def test_two_runs_of_one_fleet_do_not_throw_each_other_out_for_ever(
    tmp_path: Path, broker_url: str, prefix: str, which: str, given_up_as: str
) -> None:
    """Two runs of one fleet at once: every vehicle's client id (its VIN) is in both. After
    a few takeovers a run gives the vehicle up and no reconnect storm follows; each run's
    accounting holds. The reason is the broker's own: ``duplicate_client_id`` where it
    says "session taken over" (MQTT 5 DISCONNECT 0x8E, as the embedded broker does),
    ``unknown`` where it just closes (Mosquitto 2.0), never a guess from timing."""
    async with contextlib.AsyncExitStack() as stack:
        if which == "embedded":
            url = (await stack.enter_async_context(EmbeddedBroker(port=0))).url
        else:
            url = broker_url
        loaded = []
        for name in ("a", "b"):
            scenario = scenario_dict(url, f"{prefix}{name}", duration="3s")
            scenario["target"]["mqtt"] = {"url": url, "sessions": "per_vehicle"}
            (tmp_path / name).mkdir()
            loaded.append(load_scenario(write_scenario(tmp_path / name / "s.yaml", scenario)))
        options = RunOptions(handle_signals=False)
        async with asyncio.timeout(60):
            results = await asyncio.gather(*(run_scenario(one, options) for one in loaded))

    reports = [result.report for result in results]
    given_up = [r["signals"]["telemetry"]["send_errors_by_reason"] for r in reports]
    assert any(errors.get(given_up_as, 0) > 0 for errors in given_up), given_up
    assert all(set(errors) <= {given_up_as, "disconnected"} for errors in given_up), given_up
    for report in reports:
        assert report["mqtt"]["fleet"]["reconnects"] <= 3 * 10  # a few per vehicle, no storm
        chain, signal = report["chains"]["telemetry"], report["signals"]["telemetry"]
        assert signal["sent"] == chain["followed"]


async def test_two_restarts_and_a_black_hole_in_one_run(tmp_path: Path, prefix: str) -> None:
    """Mosquitto restarted twice and the fleet's path black-holed, in one run of
    OUTAGE_RUN_S (14 s with a 3 s hole here; FLEETPROBE_OUTAGE_RUN_S=60 runs the long form
    with a 5 s hole): the run goes to its end, exits as its objectives say, every signal
    is accounted for, and the report names each outage and the fault window."""
    hole_s = 5 if OUTAGE_RUN_S >= 60 else 3
    broker = MosquittoProcess()
    broker.start()
    try:
        drill = yaml.safe_load((REPO / "scenarios/drills/broker-black-hole.yaml").read_text())
        scenario = scenario_dict(broker.url, prefix, duration=f"{OUTAGE_RUN_S:g}s")
        scenario["target"]["mqtt"].update(sessions="per_vehicle", via="fleet-broker")
        scenario["faults"] = drill["faults"]
        scenario["faults"]["proxies"][0]["upstream"] = f"127.0.0.1:{broker.port}"
        hole = {"at": f"{0.43 * OUTAGE_RUN_S:.1f}s", "for": f"{hole_s}s"}
        scenario["faults"]["timeline"][0].update(hole)
        scenario["expect"] = [
            {"fault": "black-hole", "chain": "telemetry", "fails_at": "broker", "min_ratio": 0.9}
        ]
        scenario["slo"] = [{"chain": "telemetry", "success_ratio": 0.5}]
        scenario["exporters"] = {
            "json": str(tmp_path / "report.json"),
            "traces": str(tmp_path / "traces.jsonl"),
        }
        loaded = load_scenario(write_scenario(tmp_path / "s.yaml", scenario))
        run = asyncio.create_task(run_scenario(loaded, RunOptions(handle_signals=False)))
        async with asyncio.timeout(20):
            await first_messages(BrokerTarget(broker.host, broker.port), f"{prefix}/#", 20)
        # Restarts at about 1 s and 80% into the run, on either side of the hole.
        for wait_s in (0.0, 0.8 * OUTAGE_RUN_S - 2 - OUTAGE_S):
            await asyncio.sleep(wait_s)  # the fault schedule itself
            await asyncio.to_thread(broker.stop)
            await asyncio.sleep(OUTAGE_S)
            await asyncio.to_thread(broker.start)
        async with asyncio.timeout(OUTAGE_RUN_S + 60):
            result = await run
    finally:
        broker.stop()

    report = result.report
    assert result.exit_code == 0, [e["detail"] for e in report["expectations"]]
    assert_every_signal_accounted(scenario, report, tmp_path / "traces.jsonl")
    for role in ("fleet", "observer"):
        outages = report["mqtt"][role]["outages"]
        assert len(outages) >= 2 and all(o["to"] is not None for o in outages), (role, outages)
    [fault] = report["faults"]
    assert fault["name"] == "black-hole" and fault["applied_at"] and fault["reverted_at"]
    assert report["chains"]["telemetry"]["failed_at"]["broker"] > 0


@pytest.mark.parametrize("kept", [True, False], ids=["broker-persistence", "broker-forgets"])
async def test_persistent_sessions_lose_nothing_over_a_broker_restart(
    tmp_path: Path, prefix: str, kept: bool
) -> None:
    """Mosquitto with persistence restarted mid-run, QoS 1, ``session: {expiry: 1h}``: the
    fleet's unacknowledged publishes go out again (DUP) and the observer's session comes
    back with what the broker queued for it, so no signal times out at the broker hop;
    the report names the outage and the resumed sessions. A broker without persistence
    comes back without the sessions: the observer subscribes again and the chain works on.
    (With clean sessions the same restart loses what was in flight: bench/brokers.py.)"""
    broker = MosquittoProcess(persistence_dir=tmp_path / "state" if kept else None)
    broker.start()
    scenario = scenario_dict(broker.url, prefix, duration="5s")
    scenario["target"]["mqtt"]["session"] = {"expiry": "1h"}
    scenario["signals"]["telemetry"]["qos"] = 1
    scenario["chains"][0]["hops"][0]["within"] = "8s"  # the outage is the broker's
    scenario["exporters"] = {
        "json": str(tmp_path / "report.json"),
        "traces": str(tmp_path / "traces.jsonl"),
    }
    options = RunOptions(handle_signals=False)
    result = await run_through_a_restart(broker, scenario, prefix, tmp_path, options)

    report = result.report
    assert result.exit_code == 0
    assert_every_signal_accounted(scenario, report, tmp_path / "traces.jsonl")
    results = report["chains"]["telemetry"]["hops"]["broker"]["results"]
    fleet, observer = report["mqtt"]["fleet"], report["mqtt"]["observer"]
    assert observer["reconnects"] == 1 and fleet["reconnects"] == 2
    assert (observer["resumed"], fleet["resumed"]) == ((1, 2) if kept else (0, 0))
    for role in (fleet, observer):
        [outage] = role["outages"]
        assert outage["duration_s"] >= OUTAGE_S * 0.9
    if kept:
        assert results.get("timeout", 0) == 0 and results["ok"] > 0, results
    last = sorted(read_traces(tmp_path), key=lambda line: line["sent_at"])[-20:]
    assert all(line["hops"]["broker"]["result"] == "ok" for line in last)


async def test_a_reconnect_storm_while_the_broker_is_down_brings_every_vehicle_back() -> None:
    """The storm fault drops every session while no broker answers: no vehicle connects
    at its time, and each comes back later, backing off, once the broker is up again (none
    is left without a reconnect loop, and a second storm works)."""
    broker = MosquittoProcess()
    broker.start()
    try:
        target = BrokerTarget(broker.host, broker.port, connect_timeout_s=1)
        vins = ["VIN00000000000001", "VIN00000000000002"]
        async with MqttPublisher(target, {}, vins) as publisher:
            await asyncio.to_thread(broker.stop)
            assert await publisher.reconnect_all(0.0, random.Random(1)) == 2
            assert not any(publisher.ready(vin) for vin in vins)
            await asyncio.to_thread(broker.start)
            async with asyncio.timeout(20):
                await asyncio.gather(*(publisher.wait_ready(vin) for vin in vins))
            assert await publisher.reconnect_all(0.0, random.Random(2)) == 2
            assert all(publisher.ready(vin) for vin in vins)
    finally:
        broker.stop()
