"""The broker matrix: fleetprobe's own MQTT client against Mosquitto, RabbitMQ's MQTT
plugin, rumqttd and amqtt, in each protocol they are asked to speak, at each QoS, and one
chain through the testbed on each. Where a broker cannot do what is asked, the answer is
named (README: Brokers); it never passes as a platform's loss."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from brokers import AmqttProcess, RabbitMqProcess, RumqttdProcess
from conftest import mqtt_hops_of_the_testbed, read_traces, run_scenario_dict, scenario_dict
from fleetprobe.testbed.platform import Testbed
from fleetprobe.testbed.topics import TestbedTopics
from fleetprobe.transport.errors import ConnectError, SendError
from fleetprobe.transport.mqtt import BrokerTarget, MqttSession, ProtocolName, parse_broker_url

needs_rabbitmq = pytest.mark.needs_tool("rabbitmq-server", "rabbitmq-server")

# (broker, protocol) -> how to get its URL from the fixtures
CELLS: list[tuple[str, ProtocolName]] = [
    ("mosquitto", "5"),
    ("mosquitto", "3.1.1"),
    ("rabbitmq", "3.1.1"),
    ("rabbitmq", "5"),
    ("rumqttd", "5"),
    ("rumqttd", "3.1.1"),
    ("amqtt", "3.1.1"),
    ("amqtt", "5"),
]
NO_MQTT_5 = {"rabbitmq", "amqtt"}  # RabbitMQ 3.10 (Debian 12) and amqtt speak only 3.1.1
NO_QOS_2 = {"rabbitmq"}  # RabbitMQ answers a QoS 2 PUBLISH with PUBACK


def _marks(broker: str) -> list[pytest.MarkDecorator]:
    return [needs_rabbitmq] if broker == "rabbitmq" else []


@pytest.fixture
def url_of(request: pytest.FixtureRequest) -> Callable[[str, ProtocolName], str]:
    """The URL of a matrix broker, starting it (once a session) when first asked."""

    def url(broker: str, protocol: ProtocolName) -> str:
        if broker == "mosquitto":
            return str(request.getfixturevalue("broker_url"))
        if broker == "rumqttd":
            rumqttd: RumqttdProcess = request.getfixturevalue("rumqttd")
            return rumqttd.url(protocol)
        fixture: RabbitMqProcess | AmqttProcess = request.getfixturevalue(broker)
        return fixture.url

    return url


def target(url: str, protocol: ProtocolName) -> BrokerTarget:
    host, port, _ = parse_broker_url(url)
    return BrokerTarget(host, port, protocol=protocol, ack_timeout_s=5)


@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize(
    ("broker", "protocol"),
    [pytest.param(b, p, marks=_marks(b), id=f"{b}-{p}") for b, p in CELLS],
)
async def test_a_publish_goes_through_or_the_broker_is_named(
    url_of: Callable[[str, ProtocolName], str],
    prefix: str,
    broker: str,
    protocol: ProtocolName,
    qos: int,
) -> None:
    """Subscribe, publish at ``qos``, receive: or a clear word of what the broker lacks."""
    broker_target = target(url_of(broker, protocol), protocol)
    if protocol == "5" and broker in NO_MQTT_5:
        with pytest.raises(ConnectError, match=r"does not speak MQTT 5.*protocol: 3\.1\.1") as err:
            async with MqttSession(broker_target):
                pass
        assert err.value.reason == "protocol"
        return
    async with MqttSession(broker_target) as subscriber, MqttSession(broker_target) as publisher:
        [granted] = await subscriber.subscribe([f"{prefix}/#"], qos=2)
        assert granted <= 2
        if qos == 2 and broker in NO_QOS_2:
            with pytest.raises(SendError, match="answered a QoS 2 PUBLISH with PUBACK") as err:
                await publisher.publish(f"{prefix}/a", b"x", qos=qos)
            assert err.value.reason == "protocol_error"
            return
        async with asyncio.timeout(10):
            await publisher.publish(f"{prefix}/a", b'{"n": 1}', qos=qos)
            async for message in subscriber.messages():
                assert (message.topic, message.payload) == (f"{prefix}/a", b'{"n": 1}')
                break


@pytest.mark.parametrize(
    ("broker", "protocol"),
    [
        pytest.param(b, p, marks=_marks(b), id=f"{b}-{p}")
        for b, p in CELLS
        if not (p == "5" and b in NO_MQTT_5)
    ],
)
async def test_a_chain_through_the_testbed_is_ok_on_every_broker(
    url_of: Callable[[str, ProtocolName], str],
    tmp_path: Path,
    prefix: str,
    broker: str,
    protocol: ProtocolName,
) -> None:
    """broker -> gateway -> processor through the testbed, QoS 1, on each broker: every
    signal ok at every hop (the testbed and the prober both speak ``protocol``)."""
    url = url_of(broker, protocol)
    platform_target = target(url, protocol)
    async with Testbed(platform_target, topics=TestbedTopics.under(prefix), seed=3):
        scenario = scenario_dict(url, prefix, chains=[_chain(prefix)], duration="2s")
        scenario["target"]["mqtt"]["protocol"] = protocol
        scenario["signals"]["telemetry"]["qos"] = 1
        scenario["exporters"] = {"traces": str(tmp_path / "traces.jsonl")}
        result = await run_scenario_dict(tmp_path, scenario)
    chain = result.report["chains"]["telemetry"]
    assert result.exit_code == 0
    assert chain["followed"] == chain["ok"] >= 50, chain
    assert all(line["verdict"] == "ok" for line in read_traces(tmp_path))


def _chain(prefix: str) -> dict[str, object]:
    return {"name": "telemetry", "signal": "telemetry", "hops": mqtt_hops_of_the_testbed(prefix)}
