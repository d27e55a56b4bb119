"""Faults of the fleet in real runs against Mosquitto: each changes what it says it does,
only while it lasts, and the accounting still adds up."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from conftest import read_traces, run_scenario_dict, scenario_dict
from fleetprobe.app.run import RunResult
from fleetprobe.transport.mqtt import BrokerTarget, MqttSession


def with_fault(broker_url: str, prefix: str, tmp_path: Path, **fault: Any) -> dict[str, Any]:
    """3 s of telemetry from 10 vehicles; ``fault`` from 1 s for 1 s."""
    scenario = scenario_dict(broker_url, prefix, duration="3s")
    scenario["signals"]["telemetry"]["payload"]["sent_at"] = "{sent_at}"
    scenario["faults"] = [{"name": "f", "at": "1s", "for": "1s", **fault}]
    scenario["exporters"] = {
        "json": str(tmp_path / "report.json"),
        "traces": str(tmp_path / "traces.jsonl"),
    }
    return scenario


def seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def affected(result: RunResult) -> int:
    count: int = result.report["faults"][0]["affected_signals"]
    return count


async def test_malformed_signals_are_sent_unfollowed_and_counted_where_seen(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    result = await run_scenario_dict(
        tmp_path, with_fault(broker_url, prefix, tmp_path, kind="malformed")
    )
    sent = result.report["signals"]["telemetry"]["sent"]
    chain = result.report["chains"]["telemetry"]
    broken = affected(result)
    assert 30 <= broken < sent  # about a third of the run
    assert chain["followed"] == chain["ok"] == sent - broken
    assert chain["hops"]["broker"]["unmatched"] == {"not_json": broken}


async def test_duplicates_show_as_duplicates_and_change_no_verdict(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    result = await run_scenario_dict(
        tmp_path, with_fault(broker_url, prefix, tmp_path, kind="duplicate")
    )
    chain = result.report["chains"]["telemetry"]
    assert chain["ok"] == chain["followed"] == result.report["signals"]["telemetry"]["sent"]
    assert chain["hops"]["broker"]["duplicates"] == affected(result) >= 30


async def test_offline_vehicles_send_what_they_held_when_back(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    scenario = with_fault(broker_url, prefix, tmp_path, kind="offline", share=0.5)
    result = await run_scenario_dict(tmp_path, scenario)
    lines = read_traces(tmp_path)
    window = result.report["faults"][0]
    start, end = seconds(window["applied_at"]), seconds(window["reverted_at"])
    offline = {
        line["vin"]
        for line in lines
        if seconds(line["sent_at"]) - seconds(line["intended_at"]) > 0.1
    }
    assert 0 < len(offline) < 10  # half the fleet, by VIN
    held = [
        line
        for line in lines
        if line["vin"] in offline and start <= seconds(line["intended_at"]) < end
    ]
    assert len(held) == affected(result) >= 10
    # Each held signal went out when the fault ended, in the order it was meant for.
    sent = [seconds(line["sent_at"]) for line in held]
    assert min(sent) >= max(seconds(line["intended_at"]) for line in held)
    by_intent = sorted(held, key=lambda line: line["intended_at"])
    assert [line["sent_at"] for line in by_intent] == sorted(line["sent_at"] for line in held)
    assert all(line["verdict"] == "ok" for line in lines)
    # Held on purpose: not the prober's emission lag.
    assert result.report["emission_lag_s"]["max"] < 0.1


async def test_clock_skew_moves_the_payload_times_only(
    tmp_path: Path, broker_url: str, broker: BrokerTarget, prefix: str
) -> None:
    scenario = with_fault(broker_url, prefix, tmp_path, kind="clock_skew", skew="-30s")
    async with MqttSession(broker) as watcher:
        await watcher.subscribe([f"{prefix}/#"])
        result = await run_scenario_dict(tmp_path, scenario)
        payload_sent_at = {}
        async with asyncio.timeout(10):
            async for message in watcher.messages():
                body = json.loads(message.payload)
                payload_sent_at[body["trace_id"]] = seconds(body["sent_at"])
                if len(payload_sent_at) == result.report["signals"]["telemetry"]["sent"]:
                    break
    offsets = [
        payload_sent_at[line["trace_id"]] - seconds(line["sent_at"])
        for line in read_traces(tmp_path)
    ]
    skewed = [offset for offset in offsets if offset < -29]
    assert len(skewed) == affected(result) >= 30
    assert all(-30.01 < offset < -29.99 for offset in skewed)
    assert all(abs(offset) < 0.01 for offset in offsets if offset >= -29)
    assert result.report["chains"]["telemetry"]["failed"] == 0
