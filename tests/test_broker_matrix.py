"""The broker matrix: fleetprobe's own MQTT client against Mosquitto, RabbitMQ's MQTT
plugin, rumqttd and amqtt, in each protocol they are asked to speak, at each QoS, and one
chain through the testbed on each. Where a broker cannot do what is asked, the answer is
named (README: Brokers); it never passes as a platform's loss."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from brokers import AmqttProcess, RabbitMqProcess, RumqttdProcess
from conftest import mqtt_hops_of_the_testbed, read_traces, run_scenario_dict, scenario_dict
from fleetprobe.testbed.platform import Testbed
from fleetprobe.testbed.topics import TestbedTopics
from fleetprobe.transport.errors import ConnectError, SendError
from fleetprobe.transport.mqtt import (
    BrokerTarget,
    InboundMessage,
    MqttSession,
    ProtocolName,
    parse_broker_url,
)

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


SPOKEN = [
    pytest.param(b, p, marks=_marks(b), id=f"{b}-{p}")
    for b, p in CELLS
    if not (p == "5" and b in NO_MQTT_5)
]


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


@pytest.mark.parametrize(("broker", "protocol"), SPOKEN)
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


@pytest.mark.parametrize(("broker", "protocol"), SPOKEN)
async def test_more_publishes_than_the_window_all_complete(
    url_of: Callable[[str, ProtocolName], str], prefix: str, broker: str, protocol: ProtocolName
) -> None:
    """300 QoS 1 publishes (and QoS 2 where the broker has it) at once, past any in-flight
    window: every one completes and arrives."""
    broker_target = target(url_of(broker, protocol), protocol)
    qos = 1 if broker in NO_QOS_2 else 2
    async with MqttSession(broker_target) as subscriber, MqttSession(broker_target) as publisher:
        await subscriber.subscribe([f"{prefix}/#"], qos=qos)
        async with asyncio.timeout(30):
            await asyncio.gather(
                *(publisher.publish(f"{prefix}/{i}", b"x", qos=1 + i % qos) for i in range(300))
            )
            seen: set[str] = set()
            async for message in subscriber.messages():
                seen.add(message.topic)
                if len(seen) == 300:
                    break


QUEUES_WHILE_AWAY = {"mosquitto": True, "rabbitmq": True, "rumqttd": True, "amqtt": False}
"""Whether the broker delivers, on resuming a session, what it queued while it was away:
amqtt 0.12 keeps the session (present, its subscriptions intact) but not the messages."""


@pytest.mark.parametrize(("broker", "protocol"), SPOKEN)
async def test_a_persistent_session_gets_what_was_queued_while_it_was_away(
    url_of: Callable[[str, ProtocolName], str], prefix: str, broker: str, protocol: ProtocolName
) -> None:
    """``session_expiry_s``: away between two connections of one session, a subscriber
    comes back to a session the broker kept, with the QoS 1 message sent meanwhile (where
    QUEUES_WHILE_AWAY says the broker queues it); one sent after the return arrives."""
    url = url_of(broker, protocol)
    kept = dataclasses.replace(target(url, protocol), session_expiry_s=60)
    session = MqttSession(kept, f"{prefix}-kept")
    await session.__aenter__()
    try:
        await session.subscribe([f"{prefix}/#"], qos=1)
        await session.disconnect(end_session=False)
        async with MqttSession(target(url, protocol)) as publisher:
            await publisher.publish(f"{prefix}/while-away", b"x", qos=1)
            await session.reconnect()
            assert session.session_present
            await publisher.publish(f"{prefix}/after", b"x", qos=1)  # no SUBSCRIBE again
        async with asyncio.timeout(10):
            topics = [message.topic async for message in _until(session, f"{prefix}/after")]
        expected = [f"{prefix}/while-away"] if QUEUES_WHILE_AWAY[broker] else []
        assert topics == [*expected, f"{prefix}/after"]
    finally:
        await session.disconnect()


async def _until(session: MqttSession, last_topic: str) -> AsyncIterator[InboundMessage]:
    async for message in session.messages():
        yield message
        if message.topic == last_topic:
            return


TAKEOVER_SAYS = {"mosquitto": None, "rabbitmq": None, "rumqttd": None, "amqtt": "leaves it open"}
"""What each broker does to the first session when a second one takes its client id:
None, it closes it without a DISCONNECT (in MQTT 5 too), so a give-up cannot name the
cause; amqtt 0.12 leaves the first connection open, with nothing delivered to it."""


@pytest.mark.parametrize(("broker", "protocol"), SPOKEN)
async def test_a_second_session_with_the_same_client_id(
    url_of: Callable[[str, ProtocolName], str], prefix: str, broker: str, protocol: ProtocolName
) -> None:
    """The first session is closed, or (amqtt) left open and fed nothing: as
    TAKEOVER_SAYS."""
    broker_target = target(url_of(broker, protocol), protocol)
    async with MqttSession(broker_target, f"{prefix}-same") as first:
        await first.subscribe([f"{prefix}/#"], qos=1)
        async with MqttSession(broker_target, f"{prefix}-same") as second:
            if TAKEOVER_SAYS[broker] == "leaves it open":
                await second.subscribe([f"{prefix}/#"], qos=1)
                await second.publish(f"{prefix}/after-takeover", b"x", qos=1)
                async with asyncio.timeout(10):
                    message = await anext(aiter(second.messages()))
                assert message.topic == f"{prefix}/after-takeover"
                assert first.connected and first.inbound_waiting == 0
                return
            await asyncio.wait_for(first.wait_disconnected(), 10)
            assert first.disconnect_code == TAKEOVER_SAYS[broker]


@pytest.mark.parametrize(("broker", "protocol"), [p for p in SPOKEN if p.values[1] == "5"])
async def test_mqtt_5_properties_pass_through_every_broker(
    url_of: Callable[[str, ProtocolName], str], prefix: str, broker: str, protocol: ProtocolName
) -> None:
    """The traceparent user property, correlation data and the subscription identifier
    arrive with the message: a hop may find the trace id in either."""
    broker_target = target(url_of(broker, protocol), protocol)
    async with MqttSession(broker_target) as subscriber, MqttSession(broker_target) as publisher:
        await subscriber.subscribe([f"{prefix}/#"], qos=1, identify=True)
        async with asyncio.timeout(10):
            await publisher.publish(
                f"{prefix}/p",
                b"{}",
                qos=1,
                user_properties=[("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01")],
                correlation_data=b"\x01\x02",
            )
            message = await anext(aiter(subscriber.messages()))
    assert message.user_properties == (("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01"),)
    assert message.correlation_data == b"\x01\x02"
    assert message.subscription_ids == (1,)
