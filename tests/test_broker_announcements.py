"""What a broker announces or answers decides what the client does, and a refusal is named
for what it is: Maximum QoS, acknowledgement types, a 3.1.1-only broker, CONNACK
capabilities, empty credentials, the 3.1.1 in-flight window, enhanced authentication,
and DISCONNECT reasons that end a session for good."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from brokers import AmqttProcess, RabbitMqProcess
from conftest import REPO, finish, fleetprobe, run_scenario_dict, scenario_dict
from fleetprobe.testbed.mosquitto import MosquittoProcess
from fleetprobe.transport.errors import ConnectError, SendError
from fleetprobe.transport.mqtt import BrokerTarget, MqttSession, parse_broker_url
from fleetprobe.transport.mqtt_codec import (
    MQTT_5,
    FrameDecoder,
    PacketType,
    Properties,
    PropertyId,
    decode_packet,
    encode_connack,
    encode_disconnect,
    encode_suback,
)

needs_rabbitmq = pytest.mark.needs_tool("rabbitmq-server", "rabbitmq-server")


def target_of(url: str, **changes: Any) -> BrokerTarget:
    host, port, _ = parse_broker_url(url)
    return BrokerTarget(host, port, **changes)


@pytest.fixture(scope="module")
def max_qos_1() -> Any:
    """Mosquitto with ``max_qos 1``: like AWS IoT Core, Azure Event Grid and RabbitMQ."""
    with MosquittoProcess(listener_options="max_qos 1") as broker:
        yield broker


# 1. Maximum QoS


async def test_the_broker_maximum_qos_is_read_and_a_publish_above_it_refused(
    max_qos_1: MosquittoProcess, prefix: str
) -> None:
    """MQTT 5 CONNACK says Maximum QoS 1: a QoS 2 publish is refused before it is sent
    (the broker would disconnect), and ``downgrade_qos`` sends it at QoS 1 instead."""
    async with MqttSession(target_of(max_qos_1.url)) as session:
        assert session.broker.maximum_qos == 1
        with pytest.raises(SendError, match="allows at most QoS 1") as refused:
            await session.publish(f"{prefix}/a", b"x", qos=2)
        assert refused.value.reason == "qos_not_supported"
    lowered = target_of(max_qos_1.url, downgrade_qos=True)
    async with MqttSession(lowered) as subscriber, MqttSession(lowered) as publisher:
        await subscriber.subscribe([f"{prefix}/#"], qos=1)
        async with asyncio.timeout(5):
            await publisher.publish(f"{prefix}/a", b"x", qos=2)
            async for message in subscriber.messages():
                assert message.topic == f"{prefix}/a"
                break


async def test_a_scenario_above_the_broker_maximum_qos_stops_before_sending(
    tmp_path: Path, max_qos_1: MosquittoProcess, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """QoS 2 signals to a broker of Maximum QoS 1: exit 3, the log names the maximum and
    the way out, nothing is sent; with ``downgrade_qos: true`` every signal is ok."""
    scenario = scenario_dict(max_qos_1.url, prefix, duration="1s")
    scenario["signals"]["telemetry"]["qos"] = 2
    with caplog.at_level(logging.ERROR):
        refused = await run_scenario_dict(tmp_path, scenario)
    assert refused.exit_code == 3
    assert "allows at most QoS 1" in caplog.text and "downgrade_qos" in caplog.text
    assert refused.report["signals"]["telemetry"]["sent"] == 0

    scenario["target"]["mqtt"]["downgrade_qos"] = True
    lowered = await run_scenario_dict(tmp_path, scenario)
    chain = lowered.report["chains"]["telemetry"]
    assert lowered.exit_code == 0
    assert chain["followed"] == chain["ok"] > 0


# 2. Acknowledgement types, 3. a 3.1.1-only broker, 6. empty credentials (RabbitMQ)


@needs_rabbitmq
async def test_a_qos_2_publish_answered_with_puback_is_named_not_a_timeout(
    tmp_path: Path, rabbitmq: RabbitMqProcess, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RabbitMQ answers QoS 2 with PUBACK (and delivers at QoS 1): no publish waits for a
    PUBCOMP that never comes, none is a broker-hop timeout, and each is counted under
    ``mqtt.fleet.protocol_errors`` with a log line that says what the broker did."""
    scenario = scenario_dict(rabbitmq.url, prefix, duration="1s")
    scenario["target"]["mqtt"].update(protocol="3.1.1", ack_timeout="3s")
    scenario["signals"]["telemetry"]["qos"] = 2
    with caplog.at_level(logging.WARNING):
        result = await run_scenario_dict(tmp_path, scenario)
    report = result.report
    results = report["chains"]["telemetry"]["hops"]["broker"]["results"]
    attempts = (
        report["signals"]["telemetry"]["sent"] + report["signals"]["telemetry"]["send_errors"]
    )
    assert results.get("timeout", 0) == 0 and results["ok"] > 0
    assert report["mqtt"]["fleet"]["protocol_errors"] == attempts >= 40
    assert (
        "a QoS 2 PUBLISH with PUBACK" in caplog.text and "does not implement QoS 2" in caplog.text
    )


@needs_rabbitmq
async def test_an_empty_user_name_is_no_user_name(rabbitmq: RabbitMqProcess) -> None:
    """``${FLEET_MQTT_USER:-}`` unset gives "": sent as no user name, which RabbitMQ takes
    as its anonymous user (a zero-length one it refuses with code 4)."""
    async with MqttSession(target_of(rabbitmq.url, protocol="3.1.1", username="", password="")):
        pass


@needs_rabbitmq
@pytest.mark.parametrize("which", ["rabbitmq", "amqtt"])
async def test_mqtt_5_to_a_3_1_1_broker_says_to_set_the_protocol(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    prefix: str,
    which: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """amqtt answers in 3.1.1 (code 1), RabbitMQ 3.10 hangs up: both runs exit 3 with
    "the broker does not speak MQTT 5 ... set target.mqtt.protocol: 3.1.1"."""
    broker: RabbitMqProcess | AmqttProcess = request.getfixturevalue(which)
    with caplog.at_level(logging.ERROR):
        result = await run_scenario_dict(tmp_path, scenario_dict(broker.url, prefix))
    assert result.exit_code == 3
    assert "does not speak MQTT 5" in caplog.text
    assert "set target.mqtt.protocol: 3.1.1" in caplog.text


# 7. The 3.1.1 in-flight window


async def test_the_3_1_1_in_flight_window_is_configurable(prefix: str) -> None:
    """Mosquitto with ``max_inflight_messages 2``, 3.1.1, QoS 2: with ``inflight: 2`` all
    400 publishes arrive (with the default 20 it acknowledges and drops the rest)."""
    with MosquittoProcess(listener_options="max_inflight_messages 2") as broker:
        narrow = target_of(broker.url, protocol="3.1.1", inflight=2)
        async with MqttSession(narrow) as subscriber, MqttSession(narrow) as publisher:
            await subscriber.subscribe([f"{prefix}/#"], qos=2)
            async with asyncio.timeout(30):
                await asyncio.gather(
                    *(publisher.publish(f"{prefix}/{i}", b"x", qos=2) for i in range(400))
                )
                received = set()
                async for message in subscriber.messages():
                    received.add(message.topic)
                    if len(received) == 400:
                        break


# 4. CONNACK capabilities, 8. AUTH, 9. DISCONNECT reasons: a broker that says so


@contextlib.asynccontextmanager
async def scripted_broker(
    connack: Properties | None,
    after_connack: Callable[[asyncio.StreamWriter], Awaitable[None]] | None,
) -> AsyncIterator[tuple[int, list[Any]]]:
    """A broker on loopback that answers CONNECT with a CONNACK of ``connack`` properties
    (None: no CONNACK), then runs ``after_connack``; it answers SUBSCRIBE as MQTT 5 lets a
    broker that announced no subscription identifiers do (DISCONNECT 0xA1 when one is
    sent anyway).
    Yields its port and every packet it received."""
    received: list[Any] = []
    no_ids = (PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE, 0) in (connack or [])

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder(1 << 20)
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                decoder.feed(data)
                while (raw := decoder.next_packet()) is not None:
                    packet = decode_packet(raw.first_byte, raw.body, MQTT_5)
                    received.append(packet)
                    if raw.packet_type == PacketType.CONNECT:
                        if connack is not None:
                            writer.write(
                                encode_connack(
                                    0,
                                    session_present=False,
                                    protocol_level=MQTT_5,
                                    properties=connack,
                                )
                            )
                        if after_connack is not None:
                            await after_connack(writer)
                    elif raw.packet_type == PacketType.SUBSCRIBE:
                        if no_ids and any(
                            k == PropertyId.SUBSCRIPTION_IDENTIFIER for k, _ in packet.properties
                        ):
                            writer.write(encode_disconnect(0xA1))
                            writer.close()
                            return
                        codes = [r.qos for r in packet.subscriptions]
                        writer.write(encode_suback(packet.packet_id, codes, MQTT_5))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()
        await server.wait_closed()


async def test_no_subscription_identifiers_where_the_broker_has_none() -> None:
    """CONNACK Subscription Identifier Available 0 (AWS IoT Core): ``identify`` sends none
    (the broker would disconnect with 0xA1), and the filters are still subscribed."""
    no_ids: Properties = [(PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE, 0)]
    async with (
        scripted_broker(no_ids, None) as (port, received),
        MqttSession(BrokerTarget("127.0.0.1", port)) as session,
    ):
        assert not session.broker.subscription_identifiers
        assert await session.subscribe(["a/+", "b/#"], qos=1, identify=True) == [1, 1]
    [subscribe] = [p for p in received if type(p).__name__ == "Subscribe"]
    assert subscribe.properties == []


async def test_a_wildcard_hop_on_a_broker_without_wildcards_stops_the_run(
    tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Wildcard Subscription Available 0: the run exits 3 naming the hop and the filter,
    before anything is sent."""
    no_wildcards: Properties = [(PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE, 0)]
    async with scripted_broker(no_wildcards, None) as (port, _):
        with caplog.at_level(logging.ERROR):
            result = await run_scenario_dict(
                tmp_path, scenario_dict(f"mqtt://127.0.0.1:{port}", prefix)
            )
    assert result.exit_code == 3
    assert "telemetry > broker" in caplog.text and "wildcard subscriptions" in caplog.text


@pytest.mark.parametrize("instead_of_connack", [True, False], ids=["for-connack", "later"])
async def test_an_auth_packet_is_named_as_enhanced_authentication(
    instead_of_connack: bool,
) -> None:
    """A broker that starts enhanced authentication (AUTH, continue) gets a clear end that
    says so, not "malformed packet" (nor a guess that it does not speak MQTT 5)."""

    async def ask_for_auth(writer: asyncio.StreamWriter) -> None:
        writer.write(b"\xf0\x02\x18\x00")  # AUTH, continue authentication, no properties

    async with scripted_broker(None if instead_of_connack else [], ask_for_auth) as (port, _):
        session = MqttSession(BrokerTarget("127.0.0.1", port))
        if instead_of_connack:
            with pytest.raises(ConnectError, match=r"enhanced authentication.*does not offer"):
                await session.__aenter__()
            return
        async with session:
            await asyncio.wait_for(session.wait_disconnected(), 5)
            assert "enhanced authentication" in session.close_reason


async def test_a_broker_that_moves_the_fleet_elsewhere_ends_its_sessions_for_good(
    tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """DISCONNECT 0x9D (server moved) with a Server Reference: the fleet does not come
    back again and again; its signals count as ``server_moved`` and the log says where."""

    async def move(writer: asyncio.StreamWriter) -> None:
        writer.write(
            encode_disconnect(
                0x9D,  # server moved
                [(PropertyId.SERVER_REFERENCE, "mqtt.elsewhere.example:8883")],
            )
        )
        writer.close()

    async with (
        scripted_broker([], None) as (observer_port, _),
        scripted_broker([], move) as (fleet_port, _),
    ):
        scenario = scenario_dict(f"mqtt://127.0.0.1:{observer_port}", prefix, duration="1s")
        scenario["faults"] = {"proxies": [{"name": "moved", "upstream": f"127.0.0.1:{fleet_port}"}]}
        scenario["target"]["mqtt"]["via"] = "moved"
        with caplog.at_level(logging.WARNING):
            result = await run_scenario_dict(tmp_path, scenario)
    errors = result.report["signals"]["telemetry"]["send_errors_by_reason"]
    assert set(errors) <= {"server_moved", "disconnected"} and errors.get("server_moved")
    assert "mqtt.elsewhere.example:8883" in caplog.text
    assert result.report["mqtt"]["fleet"]["given_up"] == 2


async def test_bad_session_settings_are_named_before_anything_starts(tmp_path: Path) -> None:
    """An expiry under a second, a zero window and a non-boolean downgrade: exit 2, each
    named with its line and field."""
    text = (REPO / "scenarios/demo.yaml").read_text()
    bad = text.replace(
        "    sessions: per_vehicle\n",
        "    sessions: per_vehicle\n    session: {expiry: 500ms}\n    inflight: 0\n"
        "    downgrade_qos: maybe\n",
        1,
    )
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    code, out, err = await finish(await fleetprobe("validate", str(path), cwd=tmp_path))
    assert code == 2
    assert "bad.yaml:14:23: target > mqtt > session > expiry: expiry must be from 1s" in out + err
    assert "bad.yaml:15:15: target > mqtt > inflight: must be >= 1" in out + err
    assert "bad.yaml:16:20: target > mqtt > downgrade_qos" in out + err
