"""Publishing and observing across MQTT versions, QoS levels and session modes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conftest import scenario_dict, write_scenario
from fleetprobe.app.run import RunOptions, run_scenario
from fleetprobe.app.scenario import load_scenario
from fleetprobe.testbed.broker import EmbeddedBroker
from fleetprobe.testbed.mosquitto import MosquittoProcess
from fleetprobe.transport.mqtt import BrokerTarget, MqttSession


@pytest.mark.parametrize(
    ("protocol", "qos", "sessions"),
    [
        ("5", 0, "per_vehicle"),
        ("5", 1, "pooled"),
        ("5", 2, "pooled"),
        ("3.1.1", 1, "per_vehicle"),
        ("3.1.1", 2, "pooled"),
    ],
)
async def test_every_protocol_and_qos_is_followed_to_the_broker(
    tmp_path: Path, broker_url: str, prefix: str, protocol: str, qos: int, sessions: str
) -> None:
    """Each combination sends and follows every signal with no error."""
    scenario = scenario_dict(broker_url, prefix, duration="1s")
    scenario["target"]["mqtt"].update(protocol=protocol, sessions=sessions)
    scenario["signals"]["telemetry"]["qos"] = qos
    loaded = load_scenario(write_scenario(tmp_path / "s.yaml", scenario))
    async with asyncio.timeout(30):
        result = await run_scenario(loaded, RunOptions(handle_signals=False))
    chain = result.report["chains"]["telemetry"]
    assert result.report["signals"]["telemetry"]["send_errors"] == 0
    assert chain["followed"] == chain["ok"] == result.report["signals"]["telemetry"]["sent"] >= 40


async def test_mqtt5_signals_carry_traceparent_and_correlation_data(
    tmp_path: Path, broker_url: str, broker: BrokerTarget, prefix: str
) -> None:
    """MQTT 5 signals carry the trace id in payload, traceparent property and Correlation Data."""
    scenario = scenario_dict(broker_url, prefix, duration="500ms")
    loaded = load_scenario(write_scenario(tmp_path / "s.yaml", scenario))
    async with MqttSession(
        BrokerTarget(broker.host, broker.port, protocol="5"), f"w-{prefix}"
    ) as watcher:
        await watcher.subscribe([f"{prefix}/vehicles/+/telemetry"])
        async with asyncio.timeout(30):
            await run_scenario(loaded, RunOptions(handle_signals=False))
            message = await anext(aiter(watcher.messages()))
    payload_id = message.payload.split(b'"trace_id":"')[1][:32].decode()
    ((name, traceparent),) = message.user_properties
    assert name == "traceparent"
    assert traceparent.split("-")[1] == payload_id
    assert message.correlation_data == bytes.fromhex(payload_id)


async def test_a_broker_gone_mid_run_counts_unsent_signals_against_the_chain(
    tmp_path: Path, prefix: str
) -> None:
    """The broker stops mid-run for good: sends fail, the chain's success ratio counts them,
    and the run exits 3 (the target went away), not 1."""
    with MosquittoProcess() as private:
        scenario = scenario_dict(private.url, prefix, duration="3s")
        scenario["slo"] = [{"chain": "telemetry", "success_ratio": 0.99}]
        loaded = load_scenario(write_scenario(tmp_path / "s.yaml", scenario))
        target = BrokerTarget(private.host, private.port)
        async with MqttSession(target, f"w-{prefix}") as watcher:
            await watcher.subscribe([f"{prefix}/#"])
            running = asyncio.create_task(run_scenario(loaded, RunOptions(handle_signals=False)))
            async with asyncio.timeout(20):
                messages = aiter(watcher.messages())
                for _ in range(20):
                    await anext(messages)
        private.stop()
        async with asyncio.timeout(60):
            result = await running
    chain = result.report["chains"]["telemetry"]
    assert result.report["signals"]["telemetry"]["send_errors"] > 0
    assert chain["unsent"] == result.report["signals"]["telemetry"]["send_errors"]
    assert result.report["objectives"][0]["measured"] < 0.99
    assert result.exit_code == 3


async def test_overlapping_filters_of_two_hops_see_each_message_once(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """Two hops on overlapping filters: with MQTT 5 each sees every signal once, no duplicates."""
    scenario = scenario_dict(broker_url, prefix, duration="1s")
    narrow = scenario["chains"][0]
    wide = {
        **narrow,
        "name": "wide",
        "hops": [{**narrow["hops"][0], "mqtt": {"topic": f"{prefix}/vehicles/#"}}],
    }
    scenario["chains"].append(wide)
    loaded = load_scenario(write_scenario(tmp_path / "s.yaml", scenario))
    async with asyncio.timeout(30):
        result = await run_scenario(loaded, RunOptions(handle_signals=False))
    sent = result.report["signals"]["telemetry"]["sent"]
    for name in ("telemetry", "wide"):
        chain = result.report["chains"][name]
        assert chain["ok"] == sent and chain["hops"]["broker"]["duplicates"] == 0, name


async def test_a_run_against_the_embedded_broker(tmp_path: Path, prefix: str) -> None:
    """The demo's fallback broker carries a whole run: every signal followed, none twice."""
    async with EmbeddedBroker(host="127.0.0.1", port=0) as embedded:
        scenario = scenario_dict(f"mqtt://127.0.0.1:{embedded.port}", prefix, duration="1s")
        scenario["signals"]["telemetry"]["qos"] = 1
        loaded = load_scenario(write_scenario(tmp_path / "s.yaml", scenario))
        async with asyncio.timeout(30):
            result = await run_scenario(loaded, RunOptions(handle_signals=False))
    chain = result.report["chains"]["telemetry"]
    assert chain["ok"] == result.report["signals"]["telemetry"]["sent"] >= 40
    assert chain["hops"]["broker"]["duplicates"] == 0
