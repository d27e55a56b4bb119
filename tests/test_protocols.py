"""Publishing and observing across MQTT versions, QoS levels and session modes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conftest import scenario_dict, write_scenario
from fleetprobe.run import RunOptions, run_scenario
from fleetprobe.scenario import load_scenario
from transport.mqtt import BrokerTarget, MqttSession


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
