"""Tests for the embedded MQTT broker (testbed.broker) and its codec.

Broker tests talk to a real broker on 127.0.0.1 with real aiomqtt clients, or
with hand-built bytes over a plain socket where the point is the wire format.
Nothing waits with sleep(): tests wait for messages or events under a timeout,
and "not delivered" is proven by a later sentinel message arriving first
(the broker keeps per-publisher order).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator

import aiomqtt
import pytest
import pytest_asyncio
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties

from fleetprobe.testbed.broker import EmbeddedBroker
from fleetprobe.transport.mqtt_codec import (
    MAX_VARINT,
    Ack,
    FrameDecoder,
    MalformedPacketError,
    PacketTooLargeError,
    PacketType,
    Properties,
    PropertyId,
    ProtocolViolationError,
    Publish,
    decode_packet,
    decode_properties,
    decode_publish_head,
    decode_varint,
    encode_ack,
    encode_properties,
    encode_publish,
    encode_varint,
    is_valid_topic_filter,
)
from fleetprobe.transport.topics import topic_matches

V311 = aiomqtt.ProtocolVersion.V311
V5 = aiomqtt.ProtocolVersion.V5
TIMEOUT = 5.0


# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------


@pytest_asyncio.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker(host="127.0.0.1", port=0) as running:
        yield running


@pytest.fixture
def prefix() -> str:
    """A topic prefix (and client-id stem) unique to one test."""
    return f"ebt-{uuid.uuid4().hex[:10]}"


def client(
    broker: EmbeddedBroker, protocol: aiomqtt.ProtocolVersion, identifier: str
) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", broker.port, protocol=protocol, identifier=identifier)


async def next_message(mqtt_client: aiomqtt.Client) -> aiomqtt.Message:
    async with asyncio.timeout(TIMEOUT):
        return await anext(aiter(mqtt_client.messages))


def reason_value(rc: object) -> int:
    """The numeric value of a paho ReasonCode (or a plain int)."""
    value = getattr(rc, "value", rc)
    assert isinstance(value, int)
    return value


def paho_props(**values: object) -> PahoProperties:
    props = PahoProperties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(props, name, value)
    return props


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_varint(len(body)) + body


def connect_packet(client_id: str, level: int = 5, keepalive: int = 0) -> bytes:
    body = _utf8("MQTT") + bytes((level, 0x02)) + keepalive.to_bytes(2, "big")
    if level == 5:
        body += b"\x00"  # no properties
    return _packet(0x10, body + _utf8(client_id))


def subscribe_packet(packet_id: int, topic_filter: str, qos: int, level: int = 5) -> bytes:
    props = b"\x00" if level == 5 else b""
    body = packet_id.to_bytes(2, "big") + props + _utf8(topic_filter) + bytes((qos,))
    return _packet(0x82, body)


def publish_packet(topic: str, payload: bytes, level: int = 5) -> bytes:
    props = b"\x00" if level == 5 else b""
    return _packet(0x30, _utf8(topic) + props + payload)


PINGREQ = b"\xc0\x00"


class RawClient:
    """A bare socket speaking hand-built MQTT, for wire-level tests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, *, rcvbuf: int | None = None) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    @classmethod
    async def connected(cls, port: int, client_id: str, level: int = 5) -> RawClient:
        raw = await cls.open(port)
        await raw.send(connect_packet(client_id, level))
        first, body = await raw.read_packet()
        assert first == 0x20 and body[1] == 0, "CONNACK refused"
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_packet(self) -> tuple[int, bytes]:
        async with asyncio.timeout(TIMEOUT):
            first = (await self.reader.readexactly(1))[0]
            length, shift = 0, 0
            while True:
                byte = (await self.reader.readexactly(1))[0]
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            return first, await self.reader.readexactly(length)

    async def read_until_closed(self) -> bytes:
        """Everything the broker sends before it closes the connection."""
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.read()

    async def close(self) -> None:
        self.writer.close()
        # The broker may have reset the connection first; closed is all we want.
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def assert_round_trip(
    broker: EmbeddedBroker, protocol: aiomqtt.ProtocolVersion, prefix: str
) -> None:
    """A fresh publisher/subscriber pair can still exchange a message."""
    async with (
        client(broker, protocol, f"{prefix}-rt-sub") as sub,
        client(broker, protocol, f"{prefix}-rt-pub") as pub,
    ):
        await sub.subscribe(f"{prefix}/rt", qos=1)
        await pub.publish(f"{prefix}/rt", b"still alive", qos=1)
        message = await next_message(sub)
        assert message.payload == b"still alive"


# ---------------------------------------------------------------------------
# Broker behaviour
# ---------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", [V311, V5], ids=["v311", "v5"])
@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_qos_round_trip(
    broker: EmbeddedBroker, prefix: str, protocol: aiomqtt.ProtocolVersion, qos: int
) -> None:
    """A message published at QoS n reaches a QoS 2 subscriber at QoS n."""
    async with (
        client(broker, protocol, f"{prefix}-sub") as sub,
        client(broker, protocol, f"{prefix}-pub") as pub,
    ):
        await sub.subscribe(f"{prefix}/qos", qos=2)
        await pub.publish(f"{prefix}/qos", b"payload-%d" % qos, qos=qos)
        message = await next_message(sub)
        assert message.topic.value == f"{prefix}/qos"
        assert message.payload == b"payload-%d" % qos
        assert message.qos == qos
        assert not message.retain
        assert broker.messages_routed == 1
        assert broker.client_count == 2


@pytest.mark.asyncio
async def test_delivery_qos_is_capped_by_granted_qos(broker: EmbeddedBroker, prefix: str) -> None:
    """A QoS 2 publish to a QoS 1 subscription is delivered at QoS 1."""
    async with (
        client(broker, V5, f"{prefix}-sub") as sub,
        client(broker, V5, f"{prefix}-pub") as pub,
    ):
        await sub.subscribe(f"{prefix}/cap", qos=1)
        await pub.publish(f"{prefix}/cap", b"x", qos=2)
        assert (await next_message(sub)).qos == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", [V311, V5], ids=["v311", "v5"])
async def test_wildcard_routing(
    broker: EmbeddedBroker, prefix: str, protocol: aiomqtt.ProtocolVersion
) -> None:
    """``+`` and ``#`` route matching topics; non-matching topics are not delivered."""
    async with (
        client(broker, protocol, f"{prefix}-sub") as sub,
        client(broker, protocol, f"{prefix}-pub") as pub,
    ):
        await sub.subscribe(f"{prefix}/+/temp", qos=1)
        await sub.subscribe(f"{prefix}/fleet/#", qos=1)
        # Overlapping subscriptions: still one copy per message.
        await sub.subscribe(f"{prefix}/fleet/+/b", qos=1)
        topics = ["v1/temp", "v1/speed", "fleet/a/b", "v1/temp/x", "other", "fleet"]
        for topic in topics:
            await pub.publish(f"{prefix}/{topic}", topic.encode(), qos=1)
        received = [(await next_message(sub)).payload for _ in range(3)]
        # "fleet" (the parent level of fleet/#) is last, so had "v1/speed",
        # "v1/temp/x" or "other" been delivered, they would show up before it.
        assert received == [b"v1/temp", b"fleet/a/b", b"fleet"]


@pytest.mark.asyncio
async def test_dollar_topics_not_matched_by_leading_wildcards(
    broker: EmbeddedBroker, prefix: str
) -> None:
    """``#`` and ``+/...`` do not match ``$`` topics, an explicit ``$`` filter does."""
    async with (
        client(broker, V5, f"{prefix}-sub") as sub,
        client(broker, V5, f"{prefix}-dollar") as dollar_sub,
        client(broker, V5, f"{prefix}-pub") as pub,
    ):
        await sub.subscribe("#", qos=1)
        await sub.subscribe("+/x", qos=1)
        await dollar_sub.subscribe(f"$ebt/{prefix}/#", qos=1)
        await pub.publish(f"$ebt/{prefix}/x", b"dollar", qos=1)
        await pub.publish(f"{prefix}/x", b"sentinel", qos=1)
        assert (await next_message(sub)).payload == b"sentinel"
        assert (await next_message(dollar_sub)).payload == b"dollar"


@pytest.mark.asyncio
async def test_v5_properties_forwarded_unchanged(broker: EmbeddedBroker, prefix: str) -> None:
    """User properties, correlation data and the other PUBLISH properties arrive unchanged."""
    user = [("vin", "WAUZZZ123"), ("probe", "1"), ("vin", "repeated")]
    async with (
        client(broker, V5, f"{prefix}-sub") as sub,
        client(broker, V5, f"{prefix}-pub") as pub,
    ):
        await sub.subscribe(f"{prefix}/props", qos=1)
        props = paho_props(
            UserProperty=user,
            CorrelationData=b"\x00\x01corr\xff",
            PayloadFormatIndicator=1,
            ContentType="application/json",
            ResponseTopic=f"{prefix}/reply",
            MessageExpiryInterval=3600,
        )
        await pub.publish(f"{prefix}/props", b'{"v": 1}', qos=1, properties=props)
        message = await next_message(sub)
        got = message.properties
        assert got is not None
        assert got.UserProperty == user
        assert got.CorrelationData == b"\x00\x01corr\xff"
        assert got.PayloadFormatIndicator == 1
        assert got.ContentType == "application/json"
        assert got.ResponseTopic == f"{prefix}/reply"
        assert got.MessageExpiryInterval in (3599, 3600)  # reduced by time spent in the broker


@pytest.mark.asyncio
async def test_v5_topic_alias_resolved(broker: EmbeddedBroker, prefix: str) -> None:
    """A publisher's topic alias is resolved and not forwarded to the subscriber."""
    async with (
        client(broker, V5, f"{prefix}-sub") as sub,
        client(broker, V5, f"{prefix}-pub") as pub,
    ):
        await sub.subscribe(f"{prefix}/alias", qos=1)
        await pub.publish(f"{prefix}/alias", b"first", qos=1, properties=paho_props(TopicAlias=3))
        await pub.publish("", b"second", qos=1, properties=paho_props(TopicAlias=3))
        for payload in (b"first", b"second"):
            message = await next_message(sub)
            assert message.topic.value == f"{prefix}/alias"
            assert message.payload == payload
            assert message.properties is not None
            assert not hasattr(message.properties, "TopicAlias")


@pytest.mark.asyncio
async def test_v311_subscriber_receives_v5_message(broker: EmbeddedBroker, prefix: str) -> None:
    """A v3.1.1 subscriber gets a v5 publisher's message with the properties dropped."""
    async with (
        client(broker, V311, f"{prefix}-sub") as sub,
        client(broker, V5, f"{prefix}-pub") as pub,
    ):
        await sub.subscribe(f"{prefix}/mixed", qos=1)
        props = paho_props(UserProperty=[("k", "v")], CorrelationData=b"c")
        await pub.publish(f"{prefix}/mixed", b"hello v3", qos=1, properties=props)
        message = await next_message(sub)
        assert message.payload == b"hello v3"
        assert message.qos == 1
        assert not message.properties


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", [V311, V5], ids=["v311", "v5"])
async def test_retained_message_delivered_and_cleared(
    broker: EmbeddedBroker, prefix: str, protocol: aiomqtt.ProtocolVersion
) -> None:
    """A retained message reaches later subscribers until an empty retained payload clears it."""
    topic = f"{prefix}/state"
    async with client(broker, protocol, f"{prefix}-pub") as pub:
        await pub.publish(topic, b"online", qos=1, retain=True)
        async with client(broker, protocol, f"{prefix}-late") as late:
            await late.subscribe(f"{prefix}/#", qos=1)
            message = await next_message(late)
            assert (message.payload, message.retain, message.qos) == (b"online", True, 1)
            # A live publish to an established subscription has RETAIN cleared.
            await pub.publish(topic, b"", qos=1, retain=True)
            cleared = await next_message(late)
            assert (cleared.payload, cleared.retain) == (b"", False)
        async with client(broker, protocol, f"{prefix}-later") as later:
            await later.subscribe(topic, qos=1)
            await pub.publish(topic, b"sentinel", qos=1)
            message = await next_message(later)
            assert (message.payload, message.retain) == (b"sentinel", False)


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", [V311, V5], ids=["v311", "v5"])
async def test_client_id_takeover_disconnects_first_client(
    broker: EmbeddedBroker, prefix: str, protocol: aiomqtt.ProtocolVersion
) -> None:
    """A second CONNECT with the same client id disconnects the first (v5: reason 0x8E)."""
    # Entered in order, so "second" connects while "first" is connected.
    async with (
        client(broker, protocol, f"{prefix}-dup") as first,
        client(broker, protocol, f"{prefix}-dup") as second,
    ):
        with pytest.raises(aiomqtt.MqttError) as excinfo:
            await next_message(first)
        if protocol == V5:
            cause = excinfo.value.__cause__
            assert isinstance(cause, aiomqtt.MqttCodeError)
            assert reason_value(cause.rc) == 0x8E
        assert broker.client_count == 1
        await second.subscribe(f"{prefix}/t", qos=1)
        await second.publish(f"{prefix}/t", b"mine now", qos=1)
        assert (await next_message(second)).payload == b"mine now"


@pytest.mark.asyncio
async def test_empty_client_id_gets_assigned_identifier(broker: EmbeddedBroker) -> None:
    """A v5 CONNECT with an empty client id is accepted with an Assigned Client Identifier."""
    raw = await RawClient.open(broker.port)
    await raw.send(connect_packet(""))
    first, body = await raw.read_packet()
    assert first == 0x20 and body[:2] == b"\x00\x00"
    props, _ = decode_properties(body, 2)
    assigned = dict(props)[PropertyId.ASSIGNED_CLIENT_IDENTIFIER]
    assert isinstance(assigned, str) and assigned
    assert dict(props)[PropertyId.SHARED_SUBSCRIPTION_AVAILABLE] == 0
    await raw.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("bad_packet", "reason"),
    [
        pytest.param(b"\x36\x05\x00\x01t\x00\x01", 0x81, id="publish-qos3"),
        pytest.param(b"\x00\x00", 0x81, id="reserved-type-0"),
        pytest.param(b"\x30\xff\xff\xff\xff\x7f", 0x81, id="remaining-length-5-bytes"),
        pytest.param(b"\x82\x05\x00\x01\x00\x01x", 0x81, id="subscribe-truncated"),
        pytest.param(b"\x30\x80\x80\x80\x01", 0x95, id="announces-2MiB"),
        pytest.param(b"\x20\x03\x00\x00\x00", 0x82, id="connack-from-client"),
    ],
)
async def test_malformed_packet_closes_only_that_connection(
    broker: EmbeddedBroker, prefix: str, bad_packet: bytes, reason: int
) -> None:
    """A malformed packet gets DISCONNECT with a reason and a close; other clients keep working."""
    async with (
        client(broker, V5, f"{prefix}-sub") as sub,
        client(broker, V311, f"{prefix}-pub") as pub,
    ):
        await sub.subscribe(f"{prefix}/ok", qos=1)
        raw = await RawClient.connected(broker.port, f"{prefix}-raw")
        await raw.send(bad_packet)
        assert await raw.read_until_closed() == b"\xe0\x01" + bytes((reason,))
        await raw.close()
        await pub.publish(f"{prefix}/ok", b"unaffected", qos=1)
        assert (await next_message(sub)).payload == b"unaffected"
        assert broker.client_count == 2


@pytest.mark.asyncio
async def test_garbage_before_connect_closes_connection(
    broker: EmbeddedBroker, prefix: str
) -> None:
    """Bytes that are not a CONNECT close the socket without a reply."""
    raw = await RawClient.open(broker.port)
    await raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await raw.read_until_closed() == b""
    await raw.close()
    await assert_round_trip(broker, V5, prefix)


@pytest.mark.asyncio
@pytest.mark.parametrize("level", [4, 5], ids=["v311", "v5"])
async def test_packets_split_into_single_bytes_are_parsed(
    broker: EmbeddedBroker, prefix: str, level: int
) -> None:
    """CONNECT, SUBSCRIBE and PUBLISH written one byte at a time are all understood."""
    topic = f"{prefix}/split"
    async with client(broker, V5, f"{prefix}-sub") as sub:
        await sub.subscribe(topic, qos=0)
        raw = await RawClient.open(broker.port)
        stream = (
            connect_packet(f"{prefix}-raw", level)
            + subscribe_packet(7, topic, 0, level)
            + publish_packet(topic, b"bytewise", level)
        )
        for index in range(len(stream)):
            await raw.send(stream[index : index + 1])
        assert (await raw.read_packet())[0] == 0x20  # CONNACK
        assert await raw.read_packet() == (
            0x90,
            b"\x00\x07" + (b"\x00" if level == 5 else b"") + b"\x00",
        )
        first, body = await raw.read_packet()  # our own publish, via the subscription
        assert first == 0x30 and body.endswith(b"bytewise")
        assert (await next_message(sub)).payload == b"bytewise"
        await raw.close()


@pytest.mark.asyncio
async def test_several_packets_in_one_write_are_parsed(broker: EmbeddedBroker, prefix: str) -> None:
    """CONNECT, SUBSCRIBE, PUBLISH and PINGREQ in a single write are answered in order."""
    topic = f"{prefix}/batch"
    raw = await RawClient.open(broker.port)
    await raw.send(
        connect_packet(f"{prefix}-raw")
        + subscribe_packet(1, topic, 1)
        + publish_packet(topic, b"batched")
        + PINGREQ
    )
    assert [(await raw.read_packet())[0] for _ in range(4)] == [0x20, 0x90, 0x30, 0xD0]
    await raw.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("level", "topic_filter", "code"),
    [
        pytest.param(4, "a/#/b", 0x80, id="v311-hash-not-last"),
        pytest.param(4, "a/b+", 0x80, id="v311-plus-in-level"),
        pytest.param(5, "a/#/b", 0x8F, id="v5-hash-not-last"),
        pytest.param(5, "$share/group/a", 0x9E, id="v5-shared"),
    ],
)
async def test_invalid_subscription_gets_failure_code(
    broker: EmbeddedBroker, prefix: str, level: int, topic_filter: str, code: int
) -> None:
    """An invalid or shared topic filter is refused in SUBACK, the connection stays up."""
    raw = await RawClient.connected(broker.port, f"{prefix}-raw", level)
    await raw.send(subscribe_packet(9, topic_filter, 1, level))
    first, body = await raw.read_packet()
    assert first == 0x90 and body[-1] == code
    await raw.send(PINGREQ)
    assert await raw.read_packet() == (0xD0, b"")
    await raw.close()


@pytest.mark.asyncio
async def test_keepalive_expiry_closes_silent_client(broker: EmbeddedBroker, prefix: str) -> None:
    """A client silent for 1.5x its keepalive is disconnected (v5: reason 0x8D)."""
    raw = await RawClient.open(broker.port)
    await raw.send(connect_packet(f"{prefix}-raw", keepalive=1))
    assert (await raw.read_packet())[0] == 0x20
    started = time.monotonic()
    assert await raw.read_until_closed() == b"\xe0\x01\x8d"
    assert time.monotonic() - started >= 1.0
    await raw.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", [V311, V5], ids=["v311", "v5"])
async def test_2000_qos1_messages_arrive_complete_and_in_order(
    broker: EmbeddedBroker, prefix: str, protocol: aiomqtt.ProtocolVersion
) -> None:
    """2,000 QoS 1 messages reach the subscriber complete and in publish order."""
    count = 2000
    async with (
        client(broker, protocol, f"{prefix}-sub") as sub,
        client(broker, protocol, f"{prefix}-pub") as pub,
    ):
        await sub.subscribe(f"{prefix}/seq", qos=1)

        async def publish_all() -> None:
            for index in range(count):
                await pub.publish(f"{prefix}/seq", str(index).encode(), qos=1)

        async with asyncio.timeout(15), asyncio.TaskGroup() as group:
            group.create_task(publish_all())
            received = []
            async for message in sub.messages:
                assert message.qos == 1
                received.append(int(message.payload))
                if len(received) == count:
                    break
        assert received == list(range(count))
        assert broker.messages_routed == count


@pytest.mark.asyncio
async def test_slow_subscriber_drops_qos0_without_blocking_others(prefix: str) -> None:
    """A subscriber that stops reading loses QoS 0 messages (counted); others get everything."""
    count, payload = 400, b"x" * 32 * 1024  # 12.8 MB: more than the kernel buffers hold
    async with EmbeddedBroker(write_buffer_limit=64 * 1024) as broker:
        stalled = await RawClient.open(broker.port, rcvbuf=4096)
        await stalled.send(connect_packet(f"{prefix}-stalled", level=4))
        await stalled.send(subscribe_packet(1, f"{prefix}/bulk", 0, level=4))
        assert (await stalled.read_packet())[0] == 0x20
        assert (await stalled.read_packet())[0] == 0x90
        # From here on the stalled client never reads again.
        async with (
            client(broker, V5, f"{prefix}-sub") as sub,
            client(broker, V5, f"{prefix}-pub") as pub,
        ):
            await sub.subscribe(f"{prefix}/bulk", qos=1)

            async def publish_all() -> None:
                for index in range(count):
                    await pub.publish(f"{prefix}/bulk", b"%d:" % index + payload, qos=1)

            async with asyncio.timeout(15), asyncio.TaskGroup() as group:
                group.create_task(publish_all())
                seen = 0
                async for message in sub.messages:
                    assert message.payload.startswith(b"%d:" % seen)
                    seen += 1
                    if seen == count:
                        break
            assert broker.messages_dropped > 0
            assert broker.client_count == 3  # the stalled client is slow, not gone
        started = time.monotonic()
    assert time.monotonic() - started < 2.0, "stop() must not wait for the stalled client"
    await stalled.close()


@pytest.mark.asyncio
async def test_stop_disconnects_clients_promptly(prefix: str) -> None:
    """stop() closes client connections at once; v5 clients get reason 0x8B."""
    broker = EmbeddedBroker()
    await broker.start()
    try:
        async with client(broker, V5, f"{prefix}-c") as mqtt_client:
            started = time.monotonic()
            await broker.stop()
            with pytest.raises(aiomqtt.MqttError) as excinfo:
                await next_message(mqtt_client)
            assert time.monotonic() - started < 2.0
            cause = excinfo.value.__cause__
            assert isinstance(cause, aiomqtt.MqttCodeError)
            assert reason_value(cause.rc) == 0x8B
    finally:
        await broker.stop()
    assert broker.client_count == 0


@pytest.mark.asyncio
async def test_will_published_on_unclean_disconnect(broker: EmbeddedBroker, prefix: str) -> None:
    """A client's will is published when its connection drops without DISCONNECT."""
    async with client(broker, V311, f"{prefix}-watcher") as watcher:
        await watcher.subscribe(f"{prefix}/will", qos=1)
        raw = await RawClient.open(broker.port)
        flags = 0x02 | 0x04 | (1 << 3)  # clean session, will flag, will QoS 1
        body = _utf8("MQTT") + bytes((4, flags)) + b"\x00\x00" + _utf8(f"{prefix}-doomed")
        body += _utf8(f"{prefix}/will") + _utf8("gone")
        await raw.send(_packet(0x10, body))
        assert (await raw.read_packet())[0] == 0x20
        await raw.close()  # no DISCONNECT first
        message = await next_message(watcher)
        assert (message.payload, message.qos) == (b"gone", 1)


# ---------------------------------------------------------------------------
# Codec (pure functions)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 1),
        (127, 1),
        (128, 2),
        (16_383, 2),
        (16_384, 3),
        (2_097_151, 3),
        (2_097_152, 4),
        (268_435_455, 4),
    ],
)
def test_varint_round_trip(value: int, size: int) -> None:
    """Variable byte integers round-trip with the minimal length at every boundary."""
    encoded = encode_varint(value)
    assert len(encoded) == size
    assert decode_varint(b"\xaa" + encoded + b"\xbb", 1) == (value, 1 + size)


def test_varint_rejects_bad_input() -> None:
    """Out-of-range, 5-byte and non-minimal varints are rejected; truncated ones need more."""
    for value in (-1, MAX_VARINT + 1):
        with pytest.raises(ValueError):
            encode_varint(value)
    with pytest.raises(MalformedPacketError):
        decode_varint(b"\xff\xff\xff\xff\x01")
    with pytest.raises(MalformedPacketError):
        decode_varint(b"\x80\x00")
    assert decode_varint(b"\xff\xff") is None
    assert decode_varint(b"") is None


def test_properties_round_trip() -> None:
    """Every property data type survives encode/decode, repeated user properties in order."""
    props: Properties = [
        (PropertyId.PAYLOAD_FORMAT_INDICATOR, 1),
        (PropertyId.MESSAGE_EXPIRY_INTERVAL, 0xFFFFFFFF),
        (PropertyId.CONTENT_TYPE, "application/json"),
        (PropertyId.RESPONSE_TOPIC, "reply/ü"),
        (PropertyId.CORRELATION_DATA, b"\x00\xffcorr"),
        (PropertyId.SUBSCRIPTION_IDENTIFIER, 268_435_455),
        (PropertyId.TOPIC_ALIAS, 65_535),
        (PropertyId.USER_PROPERTY, ("a", "1")),
        (PropertyId.USER_PROPERTY, ("a", "2")),
        (PropertyId.USER_PROPERTY, ("", "")),
    ]
    encoded = encode_properties(props)
    assert decode_properties(b"xy" + encoded, 2) == (props, 2 + len(encoded))
    assert encode_properties([]) == b"\x00"


def test_properties_reject_duplicates_and_unknown_ids() -> None:
    """A repeated single-use property is a protocol error, an unknown id is malformed."""
    twice = encode_properties([(PropertyId.CONTENT_TYPE, "a"), (PropertyId.CONTENT_TYPE, "b")])
    with pytest.raises(ProtocolViolationError):
        decode_properties(twice)
    with pytest.raises(MalformedPacketError):
        decode_properties(b"\x02\x7f\x00")
    with pytest.raises(MalformedPacketError):
        decode_properties(b"\x05\x01\x01")  # length beyond the data


def test_publish_and_ack_round_trip() -> None:
    """PUBLISH and PUBACK encode/decode symmetrically for both protocol levels."""
    props: Properties = [
        (PropertyId.USER_PROPERTY, ("k", "v")),
        (PropertyId.CORRELATION_DATA, b"c"),
    ]
    for level in (4, 5):
        publish = Publish("a/b", b"\x00payload", 2, True, True, 513, props if level == 5 else [])
        data = encode_publish(publish, level)
        decoder = FrameDecoder(1024)
        decoder.feed(data)
        raw = decoder.next_packet()
        assert raw is not None
        assert decode_packet(raw.first_byte, raw.body, level) == publish
        ack = encode_ack(PacketType.PUBACK, 513, level, 0x10)
        decoded = decode_packet(ack[0], ack[2:], level)
        assert decoded == Ack(PacketType.PUBACK, 513, 0x10 if level == 5 else 0)


def test_frame_decoder_handles_split_and_batched_input() -> None:
    """Packets fed one byte at a time or several per chunk come out whole and in order."""
    stream = encode_publish(Publish("t", b"x" * 300), 4) + b"\xc0\x00" + b"\xe0\x00"
    decoder = FrameDecoder(1024)
    out = []
    for index in range(len(stream)):
        decoder.feed(stream[index : index + 1])
        while (raw := decoder.next_packet()) is not None:
            out.append(raw.first_byte)
    assert out == [0x30, 0xC0, 0xE0]
    decoder.feed(stream)
    assert [decoder.next_packet(), decoder.next_packet(), decoder.next_packet()] == [
        (0x30, stream[3:306], 0),
        (0xC0, b"", 0),
        (0xE0, b"", 0),
    ]
    assert decoder.next_packet() is None


def test_frame_decoder_cuts_a_packet_over_its_keep_limit_and_drops_the_rest() -> None:
    """Over ``keep_at_most``, a packet's head comes out (topic, packet id) and the rest of
    its bytes are dropped as they arrive, however split; the next packet is whole."""
    big = encode_publish(Publish("a/topic", b"y" * 100_000, qos=1, packet_id=7), 4)
    stream = big + b"\xc0\x00"
    decoder = FrameDecoder(1 << 20, keep_at_most=70_000)
    out = []
    for start in range(0, len(stream), 4096):
        decoder.feed(stream[start : start + 4096])
        while (raw := decoder.next_packet()) is not None:
            out.append(raw)
    cut, ping = out
    assert cut.cut_from == len(big) - 4 and len(cut.body) <= 65_539
    assert decode_publish_head(cut.first_byte, cut.body) == ("a/topic", 1, 7)
    assert (ping.first_byte, ping.body, ping.cut_from) == (0xC0, b"", 0)


def test_frame_decoder_rejects_oversized_packet_from_header() -> None:
    """An oversized packet is refused as soon as its header is seen."""
    decoder = FrameDecoder(1024)
    decoder.feed(b"\x30\x80\x08")  # announces 1024 bytes of body
    with pytest.raises(PacketTooLargeError):
        decoder.next_packet()


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/x/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+", "a/b", False),
        ("+/+", "/finance", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/b", "a/b/", False),
    ],
)
def test_topic_matching(topic_filter: str, topic: str, matches: bool) -> None:
    """Wildcard matching follows the spec, including the ``$`` rule."""
    assert is_valid_topic_filter(topic_filter)
    assert topic_matches(topic_filter, topic) is matches


@pytest.mark.parametrize("topic_filter", ["", "a/#/b", "a#", "a/b+", "#/"])
def test_invalid_topic_filters(topic_filter: str) -> None:
    """Misplaced wildcards and empty filters are invalid."""
    assert not is_valid_topic_filter(topic_filter)
