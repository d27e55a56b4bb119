"""The proxy's lenient MQTT framer (pure logic)."""

from __future__ import annotations

from fleetprobe.faults.mqtt_frames import (
    MqttFramer,
    Packet,
    Session,
    inspect_publish,
    with_dup_flag,
)
from fleetprobe.transport.mqtt_codec import MQTT_5, PacketType, PropertyId, Publish, encode_publish


def connect_packet(client_id: str, level: int) -> bytes:
    """A minimal CONNECT (clean start, keep alive 30)."""
    body = b"\x00\x04MQTT" + bytes([level, 0x02]) + b"\x00\x1e"
    if level == MQTT_5:
        body += b"\x00"  # no properties
    body += len(client_id).to_bytes(2, "big") + client_id.encode()
    return bytes([0x10, len(body)]) + body


def stream(level: int = 4) -> tuple[bytes, list[bytes]]:
    packets = [
        connect_packet("veh-1", level),
        encode_publish(Publish("a/b", b'{"n":1}'), level),
        encode_publish(Publish("a/c", b"x" * 300, qos=1, packet_id=7), level),  # 2-byte length
        b"\xc0\x00",  # PINGREQ
    ]
    return b"".join(packets), packets


def test_whole_packets_come_out_however_the_bytes_are_cut() -> None:
    data, packets = stream()
    for cut in (1, 2, 3, 7, 64, len(data)):
        framer = MqttFramer("upstream")
        out: list[Packet] = []
        for start in range(0, len(data), cut):
            out.extend(framer.feed(data[start : start + cut]))
        assert [p.data for p in out] == packets
        assert [p.kind for p in out] == [
            PacketType.CONNECT,
            PacketType.PUBLISH,
            PacketType.PUBLISH,
            12,
        ]
        assert not framer.raw


def test_a_stream_that_does_not_open_like_mqtt_passes_raw() -> None:
    framer = MqttFramer("upstream")
    tls_hello = b"\x16\x03\x01\x02\x00"
    assert framer.feed(tls_hello) == [Packet(tls_hello, None)]
    assert framer.feed(b"\x10\x00") == [Packet(b"\x10\x00", None)]


def test_after_a_malformed_header_the_rest_passes_raw_and_unchanged() -> None:
    data, packets = stream()
    framer = MqttFramer("upstream")
    garbage = b"\x30\xff\xff\xff\xff\x01rest"  # remaining length longer than 4 bytes
    out = framer.feed(data + garbage) + framer.feed(b"more")
    assert [p.data for p in out] == [*packets, garbage, b"more"]
    assert out[-1].kind is None and framer.raw


def test_connect_gives_level_and_client_id_and_publish_its_topic() -> None:
    for level in (4, MQTT_5):
        _, packets = stream(level)
        session = Session()
        session.learn_connect(Packet(packets[0], PacketType.CONNECT))
        assert (session.protocol_level, session.client_id) == (level, "veh-1")
        view = inspect_publish(Packet(packets[2], PacketType.PUBLISH), session, "upstream")
        assert (view.topic, view.qos) == ("a/c", 1)
        assert packets[2][view.payload_offset :] == b"x" * 300


def test_topic_aliases_are_resolved_per_direction() -> None:
    session = Session(protocol_level=MQTT_5)
    alias = [(PropertyId.TOPIC_ALIAS, 3), (PropertyId.USER_PROPERTY, ("k", "v"))]
    first = encode_publish(Publish("cars/1", b"a", properties=alias), MQTT_5)
    again = encode_publish(Publish("", b"b", properties=alias[:1]), MQTT_5)
    assert inspect_publish(Packet(first, PacketType.PUBLISH), session, "upstream").topic == "cars/1"
    view = inspect_publish(Packet(again, PacketType.PUBLISH), session, "upstream")
    assert view.topic == "cars/1" and again[view.payload_offset :] == b"b"


def test_the_duplicate_of_a_qos1_publish_carries_dup() -> None:
    qos1 = Packet(encode_publish(Publish("t", b"p", qos=1, packet_id=1), 4), PacketType.PUBLISH)
    qos0 = Packet(encode_publish(Publish("t", b"p"), 4), PacketType.PUBLISH)
    assert with_dup_flag(qos1).data[0] == qos1.data[0] | 0x08
    assert with_dup_flag(qos0) == qos0
