"""Pure encoding and decoding of MQTT 3.1.1 and 5.0 control packets.

No I/O happens here: the embedded broker and the client session
(:mod:`transport.mqtt`) feed raw bytes in and get packet objects out, and turn
what they send into bytes with the ``encode_*`` functions. Both sides are
covered: the packets a client sends (CONNECT, SUBSCRIBE, PINGREQ, ...) and
those a server sends (CONNACK, SUBACK, ...); PUBLISH and the PUBACK family go
both ways.

Properties (MQTT 5.0) are kept as an ordered list of ``(identifier, value)``
pairs so that repeated properties such as User Property survive a decode and
re-encode unchanged.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeAlias

from fleetprobe.core.errors import FleetprobeError
from fleetprobe.transport.topics import check_topic_filter

MQTT_311 = 4
"""Protocol level of MQTT 3.1.1."""
MQTT_5 = 5
"""Protocol level of MQTT 5.0."""
MAX_VARINT = 268_435_455
"""Largest value a variable byte integer can hold (four bytes)."""

PropertyValue: TypeAlias = int | str | bytes | tuple[str, str]
Properties: TypeAlias = list[tuple[int, PropertyValue]]


class PacketType(enum.IntEnum):
    """MQTT control packet types (upper nibble of the first byte)."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


class ReasonCode(enum.IntEnum):
    """The MQTT 5.0 reason codes this broker sends or inspects."""

    SUCCESS = 0x00
    DISCONNECT_WITH_WILL = 0x04
    NO_SUBSCRIPTION_EXISTED = 0x11
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E


class ConnackCode311(enum.IntEnum):
    """CONNACK return codes of MQTT 3.1.1."""

    ACCEPTED = 0x00
    UNACCEPTABLE_PROTOCOL_VERSION = 0x01
    IDENTIFIER_REJECTED = 0x02


class PropertyId(enum.IntEnum):
    """MQTT 5.0 property identifiers."""

    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


class _Kind(enum.Enum):
    """Wire data types of property values."""

    BYTE = enum.auto()
    TWO_BYTE = enum.auto()
    FOUR_BYTE = enum.auto()
    VARINT = enum.auto()
    UTF8 = enum.auto()
    BINARY = enum.auto()
    UTF8_PAIR = enum.auto()


_PROPERTY_KINDS: dict[int, _Kind] = {
    PropertyId.PAYLOAD_FORMAT_INDICATOR: _Kind.BYTE,
    PropertyId.MESSAGE_EXPIRY_INTERVAL: _Kind.FOUR_BYTE,
    PropertyId.CONTENT_TYPE: _Kind.UTF8,
    PropertyId.RESPONSE_TOPIC: _Kind.UTF8,
    PropertyId.CORRELATION_DATA: _Kind.BINARY,
    PropertyId.SUBSCRIPTION_IDENTIFIER: _Kind.VARINT,
    PropertyId.SESSION_EXPIRY_INTERVAL: _Kind.FOUR_BYTE,
    PropertyId.ASSIGNED_CLIENT_IDENTIFIER: _Kind.UTF8,
    PropertyId.SERVER_KEEP_ALIVE: _Kind.TWO_BYTE,
    PropertyId.AUTHENTICATION_METHOD: _Kind.UTF8,
    PropertyId.AUTHENTICATION_DATA: _Kind.BINARY,
    PropertyId.REQUEST_PROBLEM_INFORMATION: _Kind.BYTE,
    PropertyId.WILL_DELAY_INTERVAL: _Kind.FOUR_BYTE,
    PropertyId.REQUEST_RESPONSE_INFORMATION: _Kind.BYTE,
    PropertyId.RESPONSE_INFORMATION: _Kind.UTF8,
    PropertyId.SERVER_REFERENCE: _Kind.UTF8,
    PropertyId.REASON_STRING: _Kind.UTF8,
    PropertyId.RECEIVE_MAXIMUM: _Kind.TWO_BYTE,
    PropertyId.TOPIC_ALIAS_MAXIMUM: _Kind.TWO_BYTE,
    PropertyId.TOPIC_ALIAS: _Kind.TWO_BYTE,
    PropertyId.MAXIMUM_QOS: _Kind.BYTE,
    PropertyId.RETAIN_AVAILABLE: _Kind.BYTE,
    PropertyId.USER_PROPERTY: _Kind.UTF8_PAIR,
    PropertyId.MAXIMUM_PACKET_SIZE: _Kind.FOUR_BYTE,
    PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE: _Kind.BYTE,
    PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE: _Kind.BYTE,
    PropertyId.SHARED_SUBSCRIPTION_AVAILABLE: _Kind.BYTE,
}

# Every other property may appear at most once in a packet (MQTT 5.0 2.2.2.2).
_REPEATABLE_PROPERTIES = frozenset({PropertyId.USER_PROPERTY, PropertyId.SUBSCRIPTION_IDENTIFIER})


class MqttError(FleetprobeError):
    """The peer violated the protocol; the connection has to be closed.

    Attributes:
        reason_code: The MQTT 5.0 reason code to report to the peer.
    """

    def __init__(self, message: str, reason_code: int = ReasonCode.MALFORMED_PACKET) -> None:
        super().__init__(message)
        self.reason_code = reason_code


class MalformedPacketError(MqttError):
    """A packet could not be parsed according to the specification."""


class ProtocolViolationError(MqttError):
    """A packet parsed fine but is not allowed here (reason 0x82)."""

    def __init__(self, message: str, reason_code: int = ReasonCode.PROTOCOL_ERROR) -> None:
        super().__init__(message, reason_code)


class PacketTooLargeError(MqttError):
    """A packet exceeds the maximum packet size (reason 0x95)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ReasonCode.PACKET_TOO_LARGE)


class UnsupportedProtocolError(MqttError):
    """The CONNECT asks for a protocol name or level other than 3.1.1 / 5.0."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ReasonCode.UNSUPPORTED_PROTOCOL_VERSION)


# --------------------------------------------------------------------------
# Packets
# --------------------------------------------------------------------------


@dataclass(slots=True)
class Will:
    """The will message carried in a CONNECT packet."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties = field(default_factory=list)


@dataclass(slots=True)
class Connect:
    """A decoded CONNECT packet."""

    protocol_level: int
    clean_start: bool
    keepalive: int
    client_id: str
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None
    properties: Properties = field(default_factory=list)


@dataclass(slots=True)
class Publish:
    """A PUBLISH packet (``packet_id`` is ``None`` for QoS 0)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = field(default_factory=list)


@dataclass(slots=True)
class Ack:
    """A PUBACK, PUBREC, PUBREL or PUBCOMP packet."""

    packet_type: PacketType
    packet_id: int
    reason_code: int = ReasonCode.SUCCESS
    properties: Properties = field(default_factory=list)


@dataclass(slots=True)
class SubscriptionRequest:
    """One topic filter of a SUBSCRIBE packet with its subscription options."""

    topic_filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(slots=True)
class Subscribe:
    """A decoded SUBSCRIBE packet."""

    packet_id: int
    subscriptions: list[SubscriptionRequest]
    properties: Properties = field(default_factory=list)


@dataclass(slots=True)
class Unsubscribe:
    """A decoded UNSUBSCRIBE packet."""

    packet_id: int
    topic_filters: list[str]
    properties: Properties = field(default_factory=list)


@dataclass(slots=True)
class PingReq:
    """A PINGREQ packet."""


@dataclass(slots=True)
class Disconnect:
    """A decoded DISCONNECT packet."""

    reason_code: int = ReasonCode.SUCCESS
    properties: Properties = field(default_factory=list)


Packet: TypeAlias = Connect | Publish | Ack | Subscribe | Unsubscribe | PingReq | Disconnect


# --------------------------------------------------------------------------
# Primitive encoders and the reader
# --------------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    """Encodes a variable byte integer.

    Args:
        value: An integer in ``0..MAX_VARINT``.

    Returns:
        One to four bytes, least significant group first.

    Raises:
        ValueError: If ``value`` is out of range.
    """
    if not 0 <= value <= MAX_VARINT:
        raise ValueError(f"variable byte integer out of range: {value}")
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        if value:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def decode_varint(data: bytes | bytearray, offset: int = 0) -> tuple[int, int] | None:
    """Decodes a variable byte integer.

    Args:
        data: The buffer to read from.
        offset: Where the integer starts.

    Returns:
        ``(value, offset just past the integer)``, or ``None`` if ``data``
        ends before the integer does.

    Raises:
        MalformedPacketError: If the integer is longer than four bytes or not
            minimally encoded.
    """
    value = 0
    for index in range(4):
        if offset + index >= len(data):
            return None
        byte = data[offset + index]
        # A trailing zero group means a shorter encoding existed, which the
        # specification forbids (MQTT 5.0 1.5.5).
        if index and byte == 0:
            raise MalformedPacketError("variable byte integer not minimally encoded")
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, offset + index + 1
    raise MalformedPacketError("variable byte integer longer than four bytes")


def _encode_u16(value: int) -> bytes:
    return struct.pack("!H", value)


def _encode_binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("binary data longer than 65535 bytes")
    return _encode_u16(len(data)) + data


def _encode_str(text: str) -> bytes:
    return _encode_binary(text.encode("utf-8"))


class _Reader:
    """Sequential reader over one packet body; any overrun is malformed."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes, offset: int = 0) -> None:
        self._data = data
        self._pos = offset

    @property
    def position(self) -> int:
        return self._pos

    def _take(self, count: int) -> bytes:
        end = self._pos + count
        if end > len(self._data):
            raise MalformedPacketError("packet shorter than its contents")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def at_end(self) -> bool:
        return self._pos >= len(self._data)

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack("!H", self._take(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack("!I", self._take(4))[0]
        return value

    def varint(self) -> int:
        decoded = decode_varint(self._data, self._pos)
        if decoded is None:
            raise MalformedPacketError("truncated variable byte integer")
        value, self._pos = decoded
        return value

    def binary(self) -> bytes:
        return self._take(self.u16())

    def utf8(self) -> str:
        raw = self.binary()
        try:
            # Strict decoding also rejects encoded surrogates (MQTT-1.5.4-1).
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedPacketError("invalid UTF-8 string") from exc
        if "\x00" in text:
            raise MalformedPacketError("UTF-8 string contains U+0000")
        return text

    def rest(self) -> bytes:
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk

    def properties(self) -> Properties:
        length = self.varint()
        end = self._pos + length
        if end > len(self._data):
            raise MalformedPacketError("property length exceeds packet")
        props: Properties = []
        seen: set[int] = set()
        while self._pos < end:
            prop_id = self.varint()
            kind = _PROPERTY_KINDS.get(prop_id)
            if kind is None:
                raise MalformedPacketError(f"unknown property 0x{prop_id:02x}")
            if prop_id in seen and prop_id not in _REPEATABLE_PROPERTIES:
                raise ProtocolViolationError(f"property 0x{prop_id:02x} repeated")
            seen.add(prop_id)
            props.append((prop_id, self._value(kind)))
        if self._pos != end:
            raise MalformedPacketError("property overruns property length")
        return props

    def _value(self, kind: _Kind) -> PropertyValue:
        if kind is _Kind.BYTE:
            return self.u8()
        if kind is _Kind.TWO_BYTE:
            return self.u16()
        if kind is _Kind.FOUR_BYTE:
            return self.u32()
        if kind is _Kind.VARINT:
            return self.varint()
        if kind is _Kind.UTF8:
            return self.utf8()
        if kind is _Kind.BINARY:
            return self.binary()
        return (self.utf8(), self.utf8())


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------


def _encode_value(prop_id: int, kind: _Kind, value: PropertyValue) -> bytes:
    if kind is _Kind.UTF8_PAIR:
        if isinstance(value, tuple):
            return _encode_str(value[0]) + _encode_str(value[1])
    elif kind is _Kind.UTF8:
        if isinstance(value, str):
            return _encode_str(value)
    elif kind is _Kind.BINARY:
        if isinstance(value, bytes):
            return _encode_binary(value)
    elif isinstance(value, int):
        if kind is _Kind.VARINT:
            return encode_varint(value)
        fmt = {_Kind.BYTE: "!B", _Kind.TWO_BYTE: "!H", _Kind.FOUR_BYTE: "!I"}[kind]
        return struct.pack(fmt, value)
    raise TypeError(f"bad value type for property 0x{prop_id:02x}: {value!r}")


def encode_properties(properties: Sequence[tuple[int, PropertyValue]]) -> bytes:
    """Encodes MQTT 5.0 properties, including the leading property length.

    Args:
        properties: ``(identifier, value)`` pairs in wire order.

    Returns:
        The property length followed by the properties.

    Raises:
        ValueError: For an unknown property identifier.
        TypeError: For a value of the wrong type.
    """
    body = bytearray()
    for prop_id, value in properties:
        kind = _PROPERTY_KINDS.get(prop_id)
        if kind is None:
            raise ValueError(f"unknown property 0x{prop_id:02x}")
        body += encode_varint(prop_id)
        body += _encode_value(prop_id, kind, value)
    return encode_varint(len(body)) + bytes(body)


def decode_properties(data: bytes, offset: int = 0) -> tuple[Properties, int]:
    """Decodes MQTT 5.0 properties starting at their property length.

    Args:
        data: The buffer to read from.
        offset: Where the property length starts.

    Returns:
        ``(properties, offset just past them)``.

    Raises:
        MqttError: If the properties are malformed.
    """
    reader = _Reader(data, offset)
    props = reader.properties()
    return props, reader.position


def get_property(properties: Properties, prop_id: int) -> PropertyValue | None:
    """Returns the first value of a property, or ``None`` if it is absent."""
    for key, value in properties:
        if key == prop_id:
            return value
    return None


def get_int_property(properties: Properties, prop_id: int) -> int | None:
    """Returns the first value of an integer property, or ``None``."""
    value = get_property(properties, prop_id)
    return value if isinstance(value, int) else None


# --------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------


class RawPacket(NamedTuple):
    """One complete packet cut out of the byte stream, not yet decoded.

    ``cut_from`` is nonzero for a packet over the decoder's ``keep_at_most``: ``body`` then
    holds only its first bytes (enough for a PUBLISH's topic and packet id), and
    ``cut_from`` is the length of the whole body, which was dropped as it arrived.
    """

    first_byte: int
    body: bytes
    cut_from: int = 0

    @property
    def packet_type(self) -> int:
        """The control packet type (upper nibble of the first byte)."""
        return self.first_byte >> 4


CUT_PACKET_HEAD = 2 + 65_535 + 2
"""What a cut packet keeps: room for a PUBLISH's topic (at most 65,535 bytes) and packet id."""


def decode_publish_head(first_byte: int, head: bytes) -> tuple[str, int, int | None]:
    """Topic, QoS and packet id from the first bytes of a PUBLISH (a cut one).

    Raises:
        MalformedPacketError: the head does not hold them.
    """
    qos = (first_byte >> 1) & 0x03
    if len(head) < 2:
        raise MalformedPacketError("PUBLISH shorter than its topic")
    size = int.from_bytes(head[:2], "big")
    if len(head) < 2 + size + (2 if qos else 0):
        raise MalformedPacketError("PUBLISH shorter than its topic")
    try:
        topic = head[2 : 2 + size].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacketError("invalid UTF-8 topic") from None
    packet_id = int.from_bytes(head[2 + size : 4 + size], "big") if qos else None
    return topic, qos, packet_id


class FrameDecoder:
    """Cuts a TCP byte stream into complete MQTT packets.

    Bytes may be fed in arbitrary pieces: a packet split over many reads and
    several packets in one read are both handled.

    Args:
        max_packet_size: Largest accepted packet, fixed header included.
        keep_at_most: Larger packets are not buffered whole: their first
            ``CUT_PACKET_HEAD`` bytes are returned and the rest is dropped as it comes.
    """

    def __init__(self, max_packet_size: int, *, keep_at_most: int | None = None) -> None:
        self.max_packet_size = max_packet_size
        self.keep_at_most = keep_at_most
        self._buf = bytearray()
        self._pos = 0
        self._dropping = 0  # bytes of a cut packet still to come and be dropped

    def feed(self, data: bytes) -> None:
        """Appends received bytes."""
        if self._dropping:
            dropped = min(self._dropping, len(data))
            self._dropping -= dropped
            data = data[dropped:]
        # Compact lazily here rather than per packet: one memmove per read.
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def peek_type(self) -> int | None:
        """The packet type of the next (possibly incomplete) packet, if known."""
        if self._pos < len(self._buf):
            return self._buf[self._pos] >> 4
        return None

    def next_packet(self) -> RawPacket | None:
        """Returns the next complete packet, or ``None`` if more bytes are needed.

        Raises:
            MalformedPacketError: If the remaining length is malformed.
            PacketTooLargeError: As soon as a header announces a packet larger
                than ``max_packet_size`` (before its body is buffered).
        """
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 2:
            return None
        decoded = decode_varint(buf, pos + 1)
        if decoded is None:
            return None
        length, body_start = decoded
        end = body_start + length
        if end - pos > self.max_packet_size:
            raise PacketTooLargeError(f"packet of {end - pos} bytes exceeds {self.max_packet_size}")
        if self.keep_at_most is not None and end - pos > self.keep_at_most:
            return self._cut(pos, body_start, length)
        if end > len(buf):
            return None
        self._pos = end
        return RawPacket(buf[pos], bytes(buf[body_start:end]))

    def _cut(self, pos: int, body_start: int, length: int) -> RawPacket | None:
        buf = self._buf
        head_end = body_start + min(length, CUT_PACKET_HEAD)
        if head_end > len(buf):
            return None  # not even its head yet
        packet = RawPacket(buf[pos], bytes(buf[body_start:head_end]), cut_from=length)
        end = body_start + length
        if end <= len(buf):
            self._pos = end
        else:
            self._pos = len(buf)
            self._dropping = end - len(buf)
        return packet


# --------------------------------------------------------------------------
# Topics
# --------------------------------------------------------------------------


def is_valid_topic_name(topic: str) -> bool:
    """Whether ``topic`` may be published to (non-empty, no wildcards)."""
    return bool(topic) and "+" not in topic and "#" not in topic


def is_valid_topic_filter(topic_filter: str) -> bool:
    """Whether ``topic_filter`` is a syntactically valid subscription filter."""
    try:
        check_topic_filter(topic_filter)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------
# Decoding client packets
# --------------------------------------------------------------------------


def decode_connect(body: bytes) -> Connect:
    """Decodes the body of a CONNECT packet.

    Raises:
        UnsupportedProtocolError: For protocols other than MQTT 3.1.1 and 5.0.
        MqttError: If the packet is malformed.
    """
    reader = _Reader(body)
    name = reader.utf8()
    level = reader.u8()
    if name != "MQTT" or level not in (MQTT_311, MQTT_5):
        raise UnsupportedProtocolError(f"unsupported protocol {name!r} level {level}")
    v5 = level == MQTT_5
    flags = reader.u8()
    if flags & 0x01:
        raise MalformedPacketError("reserved CONNECT flag set")
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    has_password = bool(flags & 0x40)
    has_username = bool(flags & 0x80)
    if will_qos == 3 or (not will_flag and (will_qos or will_retain)):
        raise MalformedPacketError("invalid will flags")
    if not v5 and has_password and not has_username:
        raise MalformedPacketError("password without user name")
    connect = Connect(
        protocol_level=level,
        clean_start=bool(flags & 0x02),
        keepalive=reader.u16(),
        client_id="",
    )
    if v5:
        connect.properties = reader.properties()
    connect.client_id = reader.utf8()
    if will_flag:
        will_props = reader.properties() if v5 else []
        topic = reader.utf8()
        connect.will = Will(topic, reader.binary(), will_qos, will_retain, will_props)
    if has_username:
        connect.username = reader.utf8()
    if has_password:
        connect.password = reader.binary()
    if not reader.at_end():
        raise MalformedPacketError("trailing bytes after CONNECT payload")
    return connect


def _check_flags(first_byte: int, expected: int) -> None:
    if first_byte & 0x0F != expected:
        raise MalformedPacketError(f"invalid fixed header flags 0x{first_byte:02x}")


def _nonzero_packet_id(reader: _Reader) -> int:
    packet_id = reader.u16()
    if packet_id == 0:
        raise MalformedPacketError("packet identifier 0")
    return packet_id


def _decode_publish(first_byte: int, reader: _Reader, v5: bool) -> Publish:
    qos = (first_byte >> 1) & 0x03
    dup = bool(first_byte & 0x08)
    if qos == 3:
        raise MalformedPacketError("PUBLISH with QoS 3")
    if dup and qos == 0:
        raise MalformedPacketError("DUP flag set on a QoS 0 PUBLISH")
    topic = reader.utf8()
    packet_id = _nonzero_packet_id(reader) if qos else None
    properties = reader.properties() if v5 else []
    return Publish(
        topic=topic,
        payload=reader.rest(),
        qos=qos,
        retain=bool(first_byte & 0x01),
        dup=dup,
        packet_id=packet_id,
        properties=properties,
    )


def _decode_ack(packet_type: PacketType, reader: _Reader, v5: bool) -> Ack:
    ack = Ack(packet_type, reader.u16())
    # MQTT 5.0 lets the reason code and the properties be omitted.
    if v5 and not reader.at_end():
        ack.reason_code = reader.u8()
        if not reader.at_end():
            ack.properties = reader.properties()
    return ack


def _decode_subscribe(reader: _Reader, v5: bool) -> Subscribe:
    packet_id = _nonzero_packet_id(reader)
    properties = reader.properties() if v5 else []
    requests: list[SubscriptionRequest] = []
    while not reader.at_end():
        topic_filter = reader.utf8()
        options = reader.u8()
        qos = options & 0x03
        reserved = options & (0xC0 if v5 else 0xFC)
        if reserved or qos == 3:
            raise MalformedPacketError(f"invalid subscription options 0x{options:02x}")
        request = SubscriptionRequest(topic_filter, qos)
        if v5:
            request.no_local = bool(options & 0x04)
            request.retain_as_published = bool(options & 0x08)
            request.retain_handling = (options >> 4) & 0x03
            if request.retain_handling == 3:
                raise ProtocolViolationError("retain handling 3")
        requests.append(request)
    if not requests:
        raise ProtocolViolationError("SUBSCRIBE without topic filters")
    return Subscribe(packet_id, requests, properties)


def _decode_unsubscribe(reader: _Reader, v5: bool) -> Unsubscribe:
    packet_id = _nonzero_packet_id(reader)
    properties = reader.properties() if v5 else []
    filters: list[str] = []
    while not reader.at_end():
        filters.append(reader.utf8())
    if not filters:
        raise ProtocolViolationError("UNSUBSCRIBE without topic filters")
    return Unsubscribe(packet_id, filters, properties)


def _decode_either_way(
    first_byte: int, reader: _Reader, v5: bool
) -> Publish | Ack | Disconnect | None:
    """The packets both sides send: PUBLISH, the PUBACK family, DISCONNECT; else None."""
    kind = first_byte >> 4
    if kind == PacketType.PUBLISH:
        return _decode_publish(first_byte, reader, v5)
    if kind in (PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBCOMP):
        _check_flags(first_byte, 0)
        return _decode_ack(PacketType(kind), reader, v5)
    if kind == PacketType.PUBREL:
        _check_flags(first_byte, 0x02)
        return _decode_ack(PacketType.PUBREL, reader, v5)
    if kind == PacketType.DISCONNECT:
        _check_flags(first_byte, 0)
        disconnect = Disconnect()
        if v5 and not reader.at_end():
            disconnect.reason_code = reader.u8()
            if not reader.at_end():
                disconnect.properties = reader.properties()
        return disconnect
    return None


def decode_packet(first_byte: int, body: bytes, protocol_level: int) -> Packet:
    """Decodes one packet sent by a client.

    Args:
        first_byte: The first byte of the fixed header (type and flags).
        body: Everything after the remaining length.
        protocol_level: The level negotiated in CONNECT (4 or 5).

    Returns:
        The decoded packet.

    Raises:
        MalformedPacketError: If the packet cannot be parsed.
        ProtocolViolationError: For packets a client must not send.
    """
    v5 = protocol_level == MQTT_5
    reader = _Reader(body)
    kind = first_byte >> 4
    packet: Packet
    shared = _decode_either_way(first_byte, reader, v5)
    if isinstance(shared, Publish):
        return shared
    if shared is not None:
        packet = shared
    elif kind == PacketType.SUBSCRIBE:
        _check_flags(first_byte, 0x02)
        packet = _decode_subscribe(reader, v5)
    elif kind == PacketType.UNSUBSCRIBE:
        _check_flags(first_byte, 0x02)
        packet = _decode_unsubscribe(reader, v5)
    elif kind == PacketType.PINGREQ:
        _check_flags(first_byte, 0)
        packet = PingReq()
    elif kind == PacketType.CONNECT:
        _check_flags(first_byte, 0)
        return decode_connect(body)
    elif kind == 0 or (kind == PacketType.AUTH and not v5):
        raise MalformedPacketError(f"reserved packet type {kind}")
    else:
        # CONNACK, SUBACK, ... only flow server to client; AUTH would need
        # enhanced authentication, which this broker does not offer.
        raise ProtocolViolationError(f"unexpected {PacketType(kind).name} from client")
    if not reader.at_end():
        raise MalformedPacketError(f"trailing bytes in {PacketType(kind).name}")
    return packet


# --------------------------------------------------------------------------
# Encoding server packets
# --------------------------------------------------------------------------


def _frame(first_byte: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return bytes((first_byte,)) + encode_varint(len(body)) + body


def encode_connack(
    reason_code: int,
    *,
    session_present: bool,
    protocol_level: int,
    properties: Properties | None = None,
) -> bytes:
    """Encodes a CONNACK (``reason_code`` is the 3.1.1 return code for level 4)."""
    head = bytes((1 if session_present else 0, reason_code))
    if protocol_level == MQTT_5:
        return _frame(0x20, head, encode_properties(properties or []))
    return _frame(0x20, head)


def encode_publish(publish: Publish, protocol_level: int) -> bytes:
    """Encodes a PUBLISH; properties are only written for MQTT 5.0."""
    first = 0x30 | (publish.qos << 1) | (0x08 if publish.dup else 0)
    first |= 0x01 if publish.retain else 0
    parts = [_encode_str(publish.topic)]
    if publish.qos:
        if not publish.packet_id:
            raise ValueError("QoS > 0 PUBLISH needs a packet identifier")
        parts.append(_encode_u16(publish.packet_id))
    if protocol_level == MQTT_5:
        parts.append(encode_properties(publish.properties))
    parts.append(publish.payload)
    return _frame(first, *parts)


def encode_ack(
    packet_type: PacketType,
    packet_id: int,
    protocol_level: int,
    reason_code: int = ReasonCode.SUCCESS,
    properties: Properties | None = None,
) -> bytes:
    """Encodes a PUBACK, PUBREC, PUBREL or PUBCOMP."""
    first = (packet_type << 4) | (0x02 if packet_type == PacketType.PUBREL else 0)
    parts = [_encode_u16(packet_id)]
    # MQTT 5.0 3.4.2.1: reason 0 without properties may be left out entirely.
    if protocol_level == MQTT_5 and (reason_code or properties):
        parts.append(bytes((reason_code,)))
        if properties:
            parts.append(encode_properties(properties))
    return _frame(first, *parts)


def encode_suback(packet_id: int, reason_codes: Sequence[int], protocol_level: int) -> bytes:
    """Encodes a SUBACK with one granted QoS or failure code per filter."""
    props = encode_properties([]) if protocol_level == MQTT_5 else b""
    return _frame(0x90, _encode_u16(packet_id), props, bytes(reason_codes))


def encode_unsuback(packet_id: int, reason_codes: Sequence[int], protocol_level: int) -> bytes:
    """Encodes an UNSUBACK (reason codes are only sent for MQTT 5.0)."""
    if protocol_level == MQTT_5:
        return _frame(0xB0, _encode_u16(packet_id), encode_properties([]), bytes(reason_codes))
    return _frame(0xB0, _encode_u16(packet_id))


def encode_pingresp() -> bytes:
    """Encodes a PINGRESP."""
    return b"\xd0\x00"


def encode_disconnect(reason_code: int, properties: Properties | None = None) -> bytes:
    """Encodes an MQTT 5.0 DISCONNECT (3.1.1 servers never send one)."""
    if properties:
        return _frame(0xE0, bytes((reason_code,)), encode_properties(properties))
    return _frame(0xE0, bytes((reason_code,)))


# --------------------------------------------------------------------------
# The client side: encoding client packets, decoding server packets
# --------------------------------------------------------------------------


@dataclass(slots=True)
class Connack:
    """A decoded CONNACK (``reason_code`` is the 3.1.1 return code for level 4)."""

    session_present: bool
    reason_code: int
    properties: Properties = field(default_factory=list)
    answered_311: bool = False
    """An MQTT 5 CONNECT answered with a 3.1.1 CONNACK: the broker speaks only 3.1.1."""


@dataclass(slots=True)
class Auth:
    """An AUTH packet (MQTT 5 enhanced authentication)."""

    reason_code: int = ReasonCode.SUCCESS
    properties: Properties = field(default_factory=list)


@dataclass(slots=True)
class Suback:
    """A decoded SUBACK: one granted QoS or failure code per requested filter."""

    packet_id: int
    reason_codes: list[int]
    properties: Properties = field(default_factory=list)


@dataclass(slots=True)
class PingResp:
    """A PINGRESP packet."""


ServerPacket: TypeAlias = Connack | Publish | Ack | Suback | PingResp | Disconnect | Auth


def encode_connect(connect: Connect) -> bytes:
    """Encodes a CONNECT (no will: fleetprobe's sessions never leave one).

    Raises:
        ValueError: A 3.1.1 password without a user name, or a field too long.
    """
    v5 = connect.protocol_level == MQTT_5
    if not v5 and connect.password is not None and connect.username is None:
        raise ValueError("MQTT 3.1.1 allows a password only with a user name")
    flags = 0x02 if connect.clean_start else 0
    flags |= 0x80 if connect.username is not None else 0
    flags |= 0x40 if connect.password is not None else 0
    parts = [_encode_str("MQTT"), bytes((connect.protocol_level, flags))]
    parts.append(_encode_u16(connect.keepalive))
    if v5:
        parts.append(encode_properties(connect.properties))
    parts.append(_encode_str(connect.client_id))
    if connect.username is not None:
        parts.append(_encode_str(connect.username))
    if connect.password is not None:
        parts.append(_encode_binary(connect.password))
    return _frame(0x10, *parts)


def encode_subscribe(subscribe: Subscribe, protocol_level: int) -> bytes:
    """Encodes a SUBSCRIBE; subscription options beyond QoS are MQTT 5.0 only."""
    parts = [_encode_u16(subscribe.packet_id)]
    v5 = protocol_level == MQTT_5
    if v5:
        parts.append(encode_properties(subscribe.properties))
    for request in subscribe.subscriptions:
        options = request.qos
        if v5:
            options |= 0x04 if request.no_local else 0
            options |= 0x08 if request.retain_as_published else 0
            options |= request.retain_handling << 4
        parts += (_encode_str(request.topic_filter), bytes((options,)))
    return _frame(0x82, *parts)


def encode_pingreq() -> bytes:
    """Encodes a PINGREQ."""
    return b"\xc0\x00"


def decode_server_packet(first_byte: int, body: bytes, protocol_level: int) -> ServerPacket:
    """Decodes one packet sent by a server.

    Raises:
        MalformedPacketError: If the packet cannot be parsed.
        ProtocolViolationError: For packets a server must not send.
    """
    v5 = protocol_level == MQTT_5
    reader = _Reader(body)
    kind = first_byte >> 4
    packet: ServerPacket
    shared = _decode_either_way(first_byte, reader, v5)
    if isinstance(shared, Publish):
        return shared
    if shared is not None:
        packet = shared
    elif kind == PacketType.CONNACK:
        _check_flags(first_byte, 0)
        flags, code = reader.u8(), reader.u8()
        if v5 and reader.at_end():
            # Every MQTT 5 CONNACK has a property length; a 3.1.1 broker answers an MQTT 5
            # CONNECT with its own two bytes, code 1 (unacceptable protocol version). Any
            # other two bytes: an MQTT 5 broker that left the properties out.
            return Connack(bool(flags & 0x01), code, answered_311=code == 1)
        packet = Connack(bool(flags & 0x01), code, reader.properties() if v5 else [])
    elif kind == PacketType.SUBACK:
        _check_flags(first_byte, 0)
        packet_id = reader.u16()
        properties = reader.properties() if v5 else []
        packet = Suback(packet_id, list(reader.rest()), properties)
    elif kind == PacketType.PINGRESP:
        _check_flags(first_byte, 0)
        packet = PingResp()
    elif kind == PacketType.AUTH and v5:
        _check_flags(first_byte, 0)
        packet = Auth()
        if not reader.at_end():
            packet.reason_code = reader.u8()
            packet.properties = reader.properties()
    else:
        name = PacketType(kind).name if kind else "reserved packet type 0"
        raise ProtocolViolationError(f"unexpected {name} from server")
    if not reader.at_end():
        raise MalformedPacketError(f"trailing bytes in {PacketType(kind).name}")
    return packet
