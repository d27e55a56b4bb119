"""Find MQTT control packets in a TCP byte stream, leniently (pure logic, no I/O).

The fault proxy must see packet boundaries to act on PUBLISH packets, yet it must never
break a stream it does not understand. So the framer only frames a stream that opens the
way MQTT does (CONNECT from a client, CONNACK from a server); anything else, and anything
after the first malformed fixed header, is passed on as raw bytes, unchanged.

Only what the toxics need is decoded: the fixed header, the CONNECT's protocol level and
client id, and a PUBLISH's topic (with MQTT 5 topic aliases), QoS and payload offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from fleetprobe.transport.mqtt_codec import MQTT_5

_TOPIC_ALIAS = 0x23
_MAX_PACKET_BYTES = 16 * 1024 * 1024
"""Longer 'packets' are taken for garbage: the framer will not buffer them whole."""
_FIRST_BYTES = {"upstream": 0x10, "downstream": 0x20}
"""The first byte each direction of an MQTT connection starts with: CONNECT, CONNACK."""

# Property identifier -> how its value is encoded, for skipping properties (MQTT 5, 2.2.2.2).
_BYTE, _U16, _U32, _VARINT, _BINARY, _PAIR = range(6)
_PROPERTY_KINDS = {
    0x01: _BYTE, 0x02: _U32, 0x03: _BINARY, 0x08: _BINARY, 0x09: _BINARY, 0x0B: _VARINT,
    0x11: _U32, 0x12: _BINARY, 0x13: _U16, 0x15: _BINARY, 0x16: _BINARY, 0x17: _BYTE,
    0x18: _U32, 0x19: _BYTE, 0x1A: _BINARY, 0x1C: _BINARY, 0x1F: _BINARY, 0x21: _U16,
    0x22: _U16, 0x23: _U16, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _U32, 0x28: _BYTE,
    0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip


class Packet(NamedTuple):
    """A whole MQTT control packet as on the wire, or raw bytes (``kind`` None)."""

    data: bytes
    kind: int | None

    @property
    def header_size(self) -> int:
        """Bytes of the fixed header (type byte and remaining length)."""
        size = 2
        while self.data[size - 1] & 0x80:
            size += 1
        return size


class MalformedError(ValueError):
    """Bytes that do not decode as the packet they claim to be."""


@dataclass
class MqttFramer:
    """Splits one direction of a connection into packets, fed as the bytes arrive.

    Args:
        direction: ``upstream`` (client to server) or ``downstream``.
    """

    direction: str
    raw: bool = False
    """True once the stream is known not to be (well-formed) MQTT: bytes pass as they are."""
    _buffer: bytearray = field(default_factory=bytearray)
    _started: bool = False

    def feed(self, data: bytes) -> list[Packet]:
        """The packets completed by ``data``; an incomplete tail waits for the next feed."""
        if self.raw:
            return [Packet(data, None)]
        if not self._started:
            if not data:
                return []
            self._started = True
            if data[0] != _FIRST_BYTES[self.direction]:
                self.raw = True
                return [Packet(data, None)]
        buffer = self._buffer
        buffer += data
        packets: list[Packet] = []
        start = 0
        end = len(buffer)
        while start < end:
            length, header = _remaining_length(buffer, start + 1, end)
            if length is None:
                break
            if length < 0 or buffer[start] >> 4 == 0 or length > _MAX_PACKET_BYTES:
                self.raw = True
                packets.append(Packet(bytes(buffer[start:]), None))
                start = end
                break
            stop = start + 1 + header + length
            if stop > end:
                break
            packets.append(Packet(bytes(buffer[start:stop]), buffer[start] >> 4))
            start = stop
        del buffer[:start]
        return packets

    def flush(self) -> bytes:
        """The bytes of an incomplete packet held back (at the end of the stream)."""
        held = bytes(self._buffer)
        self._buffer.clear()
        return held


def _remaining_length(buffer: bytearray, offset: int, end: int) -> tuple[int | None, int]:
    """(remaining length, bytes it took); (None, 0) if incomplete; (-1, 0) if malformed."""
    value = 0
    for i in range(4):
        if offset + i >= end:
            return None, 0
        byte = buffer[offset + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, i + 1
    return -1, 0


@dataclass
class Session:
    """What the proxy learned about one MQTT connection from its CONNECT."""

    protocol_level: int = 4
    client_id: str | None = None
    aliases: dict[str, dict[int, str]] = field(
        default_factory=lambda: {"upstream": {}, "downstream": {}}
    )
    """Topic aliases per direction (MQTT 5): each direction has its own alias space."""

    def learn_connect(self, packet: Packet) -> None:
        """Take the protocol level and client id from a CONNECT; ignore what does not parse."""
        try:
            reader = _Reader(packet.data, packet.header_size)
            reader.string()  # protocol name
            self.protocol_level = reader.byte()
            reader.skip(3)  # connect flags, keep alive
            if self.protocol_level == MQTT_5:
                reader.skip(reader.varint())
            self.client_id = reader.string()
        except MalformedError:
            return


class PublishView(NamedTuple):
    """The parts of a PUBLISH the toxics look at."""

    topic: str
    qos: int
    payload_offset: int


def inspect_publish(packet: Packet, session: Session, direction: str) -> PublishView:
    """Topic (aliases resolved), QoS and where the payload starts.

    Raises:
        MalformedError: the packet does not parse, or uses an alias never defined.
    """
    reader = _Reader(packet.data, packet.header_size)
    topic = reader.string()
    qos = (packet.data[0] >> 1) & 0x03
    if qos:
        reader.skip(2)
    if session.protocol_level == MQTT_5:
        alias = _topic_alias(reader)
        if alias is not None:
            known = session.aliases[direction]
            if topic:
                known[alias] = topic
            elif alias in known:
                topic = known[alias]
            else:
                raise MalformedError(f"topic alias {alias} was never defined")
    return PublishView(topic, qos, reader.offset)


def with_dup_flag(packet: Packet) -> Packet:
    """The same PUBLISH marked as a redelivery (DUP) when its QoS allows it."""
    first = packet.data[0]
    if (first >> 1) & 0x03 == 0:
        return packet
    return Packet(bytes([first | 0x08]) + packet.data[1:], packet.kind)


def _topic_alias(reader: _Reader) -> int | None:
    """Read the properties of a PUBLISH; return its Topic Alias, if any."""
    end = reader.varint()
    end += reader.offset
    alias = None
    while reader.offset < end:
        identifier = reader.varint()
        kind = _PROPERTY_KINDS.get(identifier)
        if kind is None:
            raise MalformedError(f"unknown property 0x{identifier:02x}")
        if identifier == _TOPIC_ALIAS:
            alias = reader.u16()
        elif kind == _BYTE:
            reader.skip(1)
        elif kind == _U16:
            reader.skip(2)
        elif kind == _U32:
            reader.skip(4)
        elif kind == _VARINT:
            reader.varint()
        elif kind == _BINARY:
            reader.skip(reader.u16())
        else:
            reader.skip(reader.u16())
            reader.skip(reader.u16())
    if reader.offset != end:
        raise MalformedError("properties overrun their length")
    return alias


class _Reader:
    """Bounds-checked reads from a packet."""

    def __init__(self, data: bytes, offset: int) -> None:
        self.data = data
        self.offset = offset

    def skip(self, count: int) -> None:
        if self.offset + count > len(self.data):
            raise MalformedError("packet ends early")
        self.offset += count

    def byte(self) -> int:
        self.skip(1)
        return self.data[self.offset - 1]

    def u16(self) -> int:
        self.skip(2)
        return int.from_bytes(self.data[self.offset - 2 : self.offset], "big")

    def varint(self) -> int:
        value = 0
        for shift in range(0, 28, 7):
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise MalformedError("variable byte integer longer than 4 bytes")

    def string(self) -> str:
        length = self.u16()
        self.skip(length)
        try:
            return self.data[self.offset - length : self.offset].decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedError("string is not UTF-8") from None
