"""An embedded, pure-Python asyncio MQTT 3.1.1 / 5.0 broker.

It lets the demo and the tests run where Mosquitto is not installed::

    async with EmbeddedBroker(host="127.0.0.1", port=0) as broker:
        ...  # clients connect to broker.url, e.g. mqtt://127.0.0.1:54321

The broker is anonymous (user names and passwords are accepted and ignored),
which is why it binds to loopback by default, and keeps everything in memory.

Supported: QoS 0/1/2 in both directions, retained messages, ``+``/``#``
wildcards, clean and persistent sessions (until the broker stops), keepalive,
client-id takeover, will messages (published at once on an unclean
disconnect; Will Delay is ignored), MQTT 5 publish properties forwarded
unchanged, inbound topic aliases, subscription identifiers, the No Local /
Retain As Published / Retain Handling options and Message Expiry.

Not supported: shared subscriptions (refused in SUBACK), enhanced
authentication (AUTH), outbound topic aliases, persistence, TLS, websockets
and ``$SYS`` topics.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType

from fleetprobe.testbed.topic_index import TopicIndex
from fleetprobe.transport.mqtt_codec import (
    MAX_VARINT,
    MQTT_5,
    MQTT_311,
    Ack,
    ConnackCode311,
    Connect,
    Disconnect,
    FrameDecoder,
    MalformedPacketError,
    MqttError,
    PacketType,
    PingReq,
    Properties,
    PropertyId,
    ProtocolViolationError,
    Publish,
    RawPacket,
    ReasonCode,
    Subscribe,
    Unsubscribe,
    UnsupportedProtocolError,
    Will,
    decode_connect,
    decode_packet,
    encode_ack,
    encode_connack,
    encode_disconnect,
    encode_pingresp,
    encode_publish,
    encode_suback,
    encode_unsuback,
    get_int_property,
    get_property,
    is_valid_topic_filter,
    is_valid_topic_name,
)
from fleetprobe.transport.topics import match_levels

_LOG = logging.getLogger(__name__)

DEFAULT_MAX_PACKET_SIZE = 1024 * 1024
"""Largest packet accepted from a client (1 MiB)."""
DEFAULT_WRITE_BUFFER_LIMIT = 1024 * 1024
"""Unsent bytes per connection above which the client counts as slow."""
DEFAULT_MAX_QUEUED_MESSAGES = 1000
"""QoS 1/2 messages held per session for a slow or offline client."""

_CONNECT_TIMEOUT = 10.0  # a fresh socket must send CONNECT within this
_READ_SIZE = 64 * 1024
_TOPIC_ALIAS_MAXIMUM = 256  # highest inbound alias; bounds each alias table
_DEFAULT_RECEIVE_MAXIMUM = 65_535
_SESSION_NEVER_EXPIRES = 0xFFFFFFFF
_STOP_TIMEOUT = 5.0  # safety net only: closed transports end their handlers at once
# Properties that describe one hop, not the message, so they are not forwarded.
_HOP_PROPERTIES = frozenset({PropertyId.TOPIC_ALIAS, PropertyId.SUBSCRIPTION_IDENTIFIER})


@dataclass(slots=True)
class _Stats:
    routed: int = 0
    dropped: int = 0


@dataclass(slots=True, eq=False)
class _Message:
    """An application message as accepted from a publisher."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties
    received_at: float  # loop.time() on arrival, to age Message Expiry

    def expiry_left(self, now: float) -> int | None:
        """Seconds of Message Expiry Interval left, ``None`` if it never expires."""
        interval = get_int_property(self.properties, PropertyId.MESSAGE_EXPIRY_INTERVAL)
        if interval is None:
            return None
        return interval - int(now - self.received_at)


@dataclass(slots=True, eq=False)
class _Outbound:
    """One message on its way to one session."""

    message: _Message
    qos: int
    retain: bool
    subscription_ids: list[int]
    packet_id: int = 0
    released: bool = False  # QoS 2: PUBREC received, PUBREL sent, PUBCOMP awaited


@dataclass(slots=True)
class _Subscription:
    levels: list[str]
    qos: int
    no_local: bool
    retain_as_published: bool
    identifier: int | None


@dataclass(slots=True, eq=False)
class _Session:
    """Per-client-id state; it outlives a connection if the client asked so."""

    client_id: str
    expiry_interval: int = 0
    subscriptions: dict[str, _Subscription] = field(default_factory=dict)
    inflight: dict[int, _Outbound] = field(default_factory=dict)  # in send order
    queue: deque[_Outbound] = field(default_factory=deque)
    inbound_qos2: set[int] = field(default_factory=set)  # PUBREC sent, PUBREL awaited
    connection: _Connection | None = None
    expiry_timer: asyncio.TimerHandle | None = None
    last_packet_id: int = 0

    def next_packet_id(self) -> int:
        """Returns a packet id not in flight (callers keep fewer than 65535)."""
        while True:
            self.last_packet_id = self.last_packet_id % 0xFFFF + 1
            if self.last_packet_id not in self.inflight:
                return self.last_packet_id


def _match(
    session: _Session, message: _Message, levels: list[str], origin: _Session | None
) -> _Outbound | None:
    """Builds the single copy ``session`` gets of ``message``, if any.

    Overlapping subscriptions yield one copy at the highest granted QoS that
    carries the identifiers of all matching subscriptions (MQTT 5.0 3.3.4).
    """
    qos = -1
    retain_as_published = False
    identifiers: list[int] = []
    for sub in session.subscriptions.values():
        if sub.no_local and session is origin:
            continue
        if not match_levels(sub.levels, levels):
            continue
        qos = max(qos, sub.qos)
        retain_as_published = retain_as_published or sub.retain_as_published
        if sub.identifier is not None:
            identifiers.append(sub.identifier)
    if qos < 0:
        return None
    # A live publish reaches established subscribers with RETAIN cleared
    # unless they asked for Retain As Published (MQTT-3.3.1-9, 3.3.1-12).
    retain = message.retain and retain_as_published
    return _Outbound(message, min(qos, message.qos), retain, identifiers)


class EmbeddedBroker:
    """A small in-memory MQTT broker running on the current event loop.

    Args:
        host: Address to bind. Loopback by default because there is no auth.
        port: TCP port; 0 picks a free one, readable from :attr:`port`.
        max_packet_size: Largest packet (fixed header included) accepted from
            a client; a larger one closes that connection. Announced to MQTT 5
            clients as Maximum Packet Size.
        write_buffer_limit: Unsent bytes per connection above which the client
            counts as slow: QoS 0 messages to it are dropped (and counted in
            :attr:`messages_dropped`), QoS 1/2 messages wait in its queue.
        max_queued_messages: QoS 1/2 messages held per session while its
            client is slow or offline; further ones are dropped and counted.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        write_buffer_limit: int = DEFAULT_WRITE_BUFFER_LIMIT,
        max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
    ) -> None:
        # 5 = the largest fixed header; the format cannot express more.
        if not 2 <= max_packet_size <= MAX_VARINT + 5:
            raise ValueError(f"max_packet_size out of range: {max_packet_size}")
        if write_buffer_limit < 1 or max_queued_messages < 0:
            raise ValueError("need write_buffer_limit >= 1 and max_queued_messages >= 0")
        self.max_packet_size = max_packet_size
        self.write_buffer_limit = write_buffer_limit
        self.max_queued_messages = max_queued_messages
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: dict[_Connection, asyncio.Task[object]] = {}
        self._sessions: dict[str, _Session] = {}
        self._subscribers: TopicIndex[_Session] = TopicIndex()
        self._retained: dict[str, _Message] = {}
        self._stats = _Stats()

    @property
    def host(self) -> str:
        """The address the broker binds to."""
        return self._host

    @property
    def port(self) -> int:
        """The bound TCP port (the real one once started with ``port=0``)."""
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://host:port`` for clients."""
        return f"mqtt://{self._host}:{self._port}"

    @property
    def client_count(self) -> int:
        """Number of clients currently connected (CONNECT accepted)."""
        return sum(1 for s in self._sessions.values() if s.connection is not None)

    @property
    def messages_routed(self) -> int:
        """PUBLISH messages accepted from clients (and wills), one per publish."""
        return self._stats.routed

    @property
    def messages_dropped(self) -> int:
        """Deliveries skipped because a subscriber was slow or offline."""
        return self._stats.dropped

    async def start(self) -> None:
        """Starts listening.

        Raises:
            RuntimeError: If the broker is already running.
            OSError: If the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("broker already started")
        self._server = await asyncio.start_server(self._handle_client, self._host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]
        _LOG.info("embedded MQTT broker listening on %s", self.url)

    async def stop(self) -> None:
        """Stops listening and closes every client connection promptly.

        MQTT 5 clients get DISCONNECT 0x8B (server shutting down); wills are
        not published. Sessions and retained messages are discarded.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        connections = list(self._connections.items())
        for conn, _ in connections:
            conn.close(ReasonCode.SERVER_SHUTTING_DOWN, publish_will=False)
            # Whatever a stuck client has not read yet would hold the socket
            # open indefinitely; shutting down beats delivering it.
            conn.abort_if_unflushed()
        # Closed transports feed EOF to the readers, so the handlers finish on
        # their own. They are not cancelled: Python 3.11's start_server logs
        # an error for every cancelled client_connected_cb task.
        tasks = [task for _, task in connections]
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=_STOP_TIMEOUT)
            for task in stuck:
                _LOG.warning("connection handler did not finish; cancelling it")
                task.cancel()
        await server.wait_closed()
        for session in self._sessions.values():
            if session.expiry_timer is not None:
                session.expiry_timer.cancel()
        self._sessions.clear()
        self._subscribers = TopicIndex()
        self._retained.clear()
        _LOG.info("embedded MQTT broker on port %d stopped", self._port)

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- internals shared with _Connection ---------------------------------

    async def _handle_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Nagle plus delayed ACKs add ~40 ms stalls to small MQTT packets.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # With the high-water mark at our limit, "congested" and "drain()
        # would block" mean the same thing (see _Connection.pump).
        writer.transport.set_write_buffer_limits(high=self.write_buffer_limit)
        task = asyncio.current_task()
        if self._server is None or task is None:
            writer.close()
            return
        conn = _Connection(self, reader, writer)
        self._connections[conn] = task
        try:
            await conn.run()
        finally:
            self._connections.pop(conn, None)

    def _attach_session(
        self, conn: _Connection, client_id: str, clean_start: bool, expiry_interval: int
    ) -> tuple[_Session, bool]:
        """Binds ``conn`` to the session of ``client_id``; returns (session, present)."""
        existing = self._sessions.get(client_id)
        if existing is not None and existing.connection is not None:
            _LOG.info("client id %r taken over by %s", client_id, conn.peer)
            existing.connection.close(ReasonCode.SESSION_TAKEN_OVER)
            existing = self._sessions.get(client_id)  # closing may have ended it
        if existing is not None and existing.expiry_timer is not None:
            existing.expiry_timer.cancel()
            existing.expiry_timer = None
        if existing is None or clean_start:
            if existing is not None:
                self._forget_subscriptions(existing)
            session, present = _Session(client_id), False
            self._sessions[client_id] = session
        else:
            session, present = existing, True
        session.expiry_interval = expiry_interval
        session.connection = conn
        return session, present

    def _detach_session(self, conn: _Connection, session: _Session) -> None:
        """Called when ``conn`` closes: keeps or ends its session."""
        if session.connection is not conn:
            return  # a newer connection took the session over already
        session.connection = None
        if session.expiry_interval == 0:
            self._end_session(session)
        elif session.expiry_interval != _SESSION_NEVER_EXPIRES and self._server is not None:
            loop = asyncio.get_running_loop()
            session.expiry_timer = loop.call_later(
                session.expiry_interval, self._end_session, session
            )

    def _end_session(self, session: _Session) -> None:
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
            self._forget_subscriptions(session)
        if session.expiry_timer is not None:
            session.expiry_timer.cancel()
            session.expiry_timer = None

    def subscribe(self, session: _Session, topic_filter: str, subscription: _Subscription) -> bool:
        """Add or replace a subscription of ``session``; True if it replaced one."""
        existed = topic_filter in session.subscriptions
        session.subscriptions[topic_filter] = subscription
        if not existed:
            self._subscribers.add(topic_filter, session)
        return existed

    def unsubscribe(self, session: _Session, topic_filter: str) -> bool:
        """Remove a subscription of ``session``; False if it had none."""
        if session.subscriptions.pop(topic_filter, None) is None:
            return False
        self._subscribers.remove(topic_filter, session)
        return True

    def _forget_subscriptions(self, session: _Session) -> None:
        for topic_filter in session.subscriptions:
            self._subscribers.remove(topic_filter, session)

    def _publish(self, message: _Message, origin: _Session | None) -> None:
        """Stores a retained message and hands a copy to each matching session."""
        if message.retain:
            if message.payload:
                self._retained[message.topic] = message
            else:
                self._retained.pop(message.topic, None)
        self._stats.routed += 1
        levels = message.topic.split("/")
        for session in self._subscribers.candidates(levels):
            out = _match(session, message, levels, origin)
            if out is None:
                continue
            if session.connection is not None:
                session.connection.deliver(out)
            elif out.qos and len(session.queue) < self.max_queued_messages:
                session.queue.append(out)  # offline persistent session
            else:
                self._stats.dropped += 1

    def _retained_matching(self, filter_levels: list[str]) -> list[_Message]:
        return [
            message
            for topic, message in self._retained.items()
            if match_levels(filter_levels, topic.split("/"))
        ]


class _Connection:
    """MQTT protocol handling for one client socket."""

    def __init__(
        self,
        broker: EmbeddedBroker,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._broker = broker
        self._reader = reader
        self._writer = writer
        self._loop = asyncio.get_running_loop()
        self.peer = str(writer.get_extra_info("peername"))
        self._level = MQTT_311
        self._session: _Session | None = None  # set once CONNECT is accepted
        self._will: Will | None = None
        self._keepalive = 0
        self._deadline: float | None = self._loop.time() + _CONNECT_TIMEOUT
        self._aliases: dict[int, str] = {}
        self._receive_maximum = _DEFAULT_RECEIVE_MAXIMUM
        self._max_outgoing_packet = MAX_VARINT + 5
        self._drain_task: asyncio.Task[None] | None = None
        self._closed = False

    async def run(self) -> None:
        """Reads and handles packets until the connection ends."""
        decoder = FrameDecoder(self._broker.max_packet_size)
        try:
            while not self._closed:
                async with asyncio.timeout_at(self._deadline):
                    chunk = await self._reader.read(_READ_SIZE)
                if not chunk:
                    _LOG.debug("%s closed the connection", self.peer)
                    break
                decoder.feed(chunk)
                if self._session is None and decoder.peek_type() != PacketType.CONNECT:
                    # Say no at once to non-MQTT peers instead of waiting for
                    # the rest of whatever length their bytes seem to announce.
                    raise ProtocolViolationError("first packet must be CONNECT")
                while not self._closed and (raw := decoder.next_packet()) is not None:
                    self._dispatch(raw)
        except MqttError as exc:
            _LOG.warning("closing MQTT connection from %s: %s", self.peer, exc)
            self.close(exc.reason_code)
        except TimeoutError:
            _LOG.info("closing %s: keepalive or CONNECT timeout", self.peer)
            self.close(ReasonCode.KEEP_ALIVE_TIMEOUT)
        except OSError as exc:
            _LOG.debug("connection from %s lost: %s", self.peer, exc)
        except Exception:
            # A bug triggered by one client must not take the broker down.
            _LOG.exception("internal error serving %s; closing it", self.peer)
            self.close(ReasonCode.UNSPECIFIED_ERROR)
        finally:
            self.close()

    def close(self, reason_code: int | None = None, *, publish_will: bool = True) -> None:
        """Closes the connection (idempotent).

        Args:
            reason_code: Sent in a DISCONNECT to MQTT 5 clients past CONNACK.
            publish_will: Whether a pending will message is published.
        """
        if self._closed:
            return
        self._closed = True
        session = self._session
        if session is not None and reason_code is not None and self._level == MQTT_5:
            self._send(encode_disconnect(reason_code))
        if self._drain_task is not None:
            self._drain_task.cancel()
        self._writer.close()
        if session is None:
            return
        will, self._will = self._will, None
        self._broker._detach_session(self, session)
        if will is not None and publish_will:
            message = _Message(
                will.topic, will.payload, will.qos, will.retain, will.properties, self._loop.time()
            )
            self._broker._publish(message, session)

    def abort_if_unflushed(self) -> None:
        """Drops the socket at once if unsent data would keep it open."""
        transport = self._writer.transport
        if transport.get_write_buffer_size():
            transport.abort()

    # -- inbound ------------------------------------------------------------

    def _dispatch(self, raw: RawPacket) -> None:
        if self._session is None:
            if raw.packet_type != PacketType.CONNECT:
                raise ProtocolViolationError("first packet must be CONNECT")
            if raw.first_byte & 0x0F:
                raise MalformedPacketError("reserved CONNECT header flags set")
            self._on_connect(raw.body)
        else:
            packet = decode_packet(raw.first_byte, raw.body, self._level)
            match packet:
                case Publish():
                    self._on_publish(packet)
                case Ack():
                    self._on_ack(packet)
                case Subscribe():
                    self._on_subscribe(packet)
                case Unsubscribe():
                    self._on_unsubscribe(packet)
                case PingReq():
                    self._send(encode_pingresp())
                case Disconnect():
                    self._on_disconnect(packet)
                case Connect():
                    raise ProtocolViolationError("second CONNECT")
        if self._session is not None:
            keepalive = self._keepalive
            self._deadline = self._loop.time() + 1.5 * keepalive if keepalive else None

    def _on_connect(self, body: bytes) -> None:
        try:
            connect = decode_connect(body)
        except UnsupportedProtocolError:
            # MQTT-3.1.2-2: refuse with return code 0x01 in the 3.1.1 format.
            code = ConnackCode311.UNACCEPTABLE_PROTOCOL_VERSION
            self._send(encode_connack(code, session_present=False, protocol_level=MQTT_311))
            raise
        self._level = level = connect.protocol_level
        props = connect.properties
        if level == MQTT_5:
            if get_property(props, PropertyId.AUTHENTICATION_METHOD) is not None:
                self._refuse(ReasonCode.BAD_AUTHENTICATION_METHOD)
                return
            receive_maximum = get_int_property(props, PropertyId.RECEIVE_MAXIMUM)
            max_packet = get_int_property(props, PropertyId.MAXIMUM_PACKET_SIZE)
            if receive_maximum == 0 or max_packet == 0:
                self._refuse(ReasonCode.PROTOCOL_ERROR)
                return
            self._receive_maximum = receive_maximum or _DEFAULT_RECEIVE_MAXIMUM
            self._max_outgoing_packet = max_packet or self._max_outgoing_packet
            expiry = get_int_property(props, PropertyId.SESSION_EXPIRY_INTERVAL) or 0
        else:
            expiry = 0 if connect.clean_start else _SESSION_NEVER_EXPIRES
        if connect.will is not None and not is_valid_topic_name(connect.will.topic):
            self._refuse(ReasonCode.TOPIC_NAME_INVALID)
            return
        connack_props: Properties = []
        client_id = connect.client_id
        if not client_id:
            if level == MQTT_311 and not connect.clean_start:
                # MQTT-3.1.3-8: a persistent session needs the client's own id.
                self._refuse(ReasonCode.CLIENT_IDENTIFIER_NOT_VALID)
                return
            client_id = f"auto-{uuid.uuid4().hex}"
            connack_props.append((PropertyId.ASSIGNED_CLIENT_IDENTIFIER, client_id))
        if connect.will is not None:
            will = connect.will
            # Will Delay is not supported: the will goes out at once.
            will.properties = [p for p in will.properties if p[0] != PropertyId.WILL_DELAY_INTERVAL]
            self._will = will
        session, present = self._broker._attach_session(
            self, client_id, connect.clean_start, expiry
        )
        self._session = session
        self._keepalive = connect.keepalive
        connack_props += [
            (PropertyId.TOPIC_ALIAS_MAXIMUM, _TOPIC_ALIAS_MAXIMUM),
            (PropertyId.MAXIMUM_PACKET_SIZE, self._broker.max_packet_size),
            (PropertyId.SHARED_SUBSCRIPTION_AVAILABLE, 0),
            (PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE, 1),
            (PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE, 1),
        ]
        self._send(
            encode_connack(
                ReasonCode.SUCCESS,
                session_present=present,
                protocol_level=level,
                properties=connack_props,
            )
        )
        _LOG.debug("%s connected as %r (MQTT level %d)", self.peer, client_id, level)
        if present:
            self._resume(session)

    def _refuse(self, reason: ReasonCode) -> None:
        """Answers CONNECT with a failure CONNACK and closes."""
        _LOG.warning("refusing CONNECT from %s: %s", self.peer, reason.name)
        if self._level == MQTT_5:
            self._send(encode_connack(reason, session_present=False, protocol_level=MQTT_5))
        elif reason == ReasonCode.CLIENT_IDENTIFIER_NOT_VALID:
            code = ConnackCode311.IDENTIFIER_REJECTED
            self._send(encode_connack(code, session_present=False, protocol_level=MQTT_311))
        # 3.1.1 has no return code for the other cases: just close.
        self.close()

    def _resolve_topic(self, packet: Publish) -> str:
        topic = packet.topic
        alias = get_int_property(packet.properties, PropertyId.TOPIC_ALIAS)
        if alias is not None:
            if not 0 < alias <= _TOPIC_ALIAS_MAXIMUM:
                raise ProtocolViolationError(
                    f"topic alias {alias} out of range", ReasonCode.TOPIC_ALIAS_INVALID
                )
            if topic:
                self._aliases[alias] = topic
            elif alias in self._aliases:
                topic = self._aliases[alias]
            else:
                raise ProtocolViolationError(f"unknown topic alias {alias}")
        if not is_valid_topic_name(topic):
            raise ProtocolViolationError(
                f"invalid topic name {topic!r}", ReasonCode.TOPIC_NAME_INVALID
            )
        return topic

    def _on_publish(self, packet: Publish) -> None:
        session = self._require_session()
        message = _Message(
            self._resolve_topic(packet),
            packet.payload,
            packet.qos,
            packet.retain,
            [p for p in packet.properties if p[0] not in _HOP_PROPERTIES],
            self._loop.time(),
        )
        packet_id = packet.packet_id
        if packet_id is None:  # QoS 0
            self._broker._publish(message, session)
        elif packet.qos == 1:
            self._broker._publish(message, session)
            self._send(encode_ack(PacketType.PUBACK, packet_id, self._level))
        else:
            # Route on PUBLISH, remember the id until PUBREL so that a DUP
            # resend is acknowledged but not routed twice (MQTT 4.3.3).
            if packet_id not in session.inbound_qos2:
                session.inbound_qos2.add(packet_id)
                self._broker._publish(message, session)
            self._send(encode_ack(PacketType.PUBREC, packet_id, self._level))

    def _on_ack(self, ack: Ack) -> None:
        session = self._require_session()
        packet_id = ack.packet_id
        if ack.packet_type == PacketType.PUBREL:
            found = packet_id in session.inbound_qos2
            session.inbound_qos2.discard(packet_id)
            reason = ReasonCode.SUCCESS if found else ReasonCode.PACKET_IDENTIFIER_NOT_FOUND
            self._send(encode_ack(PacketType.PUBCOMP, packet_id, self._level, reason))
            return
        out = session.inflight.get(packet_id)
        if ack.packet_type == PacketType.PUBREC:
            if out is None or out.qos != 2:
                reason = ReasonCode.PACKET_IDENTIFIER_NOT_FOUND
                self._send(encode_ack(PacketType.PUBREL, packet_id, self._level, reason))
            elif ack.reason_code >= ReasonCode.UNSPECIFIED_ERROR:
                # The subscriber refused the message; the flow ends here.
                del session.inflight[packet_id]
                self.pump()
            else:
                out.released = True
                self._send(encode_ack(PacketType.PUBREL, packet_id, self._level))
            return
        expected_qos = 1 if ack.packet_type == PacketType.PUBACK else 2
        if out is None or out.qos != expected_qos:
            name = ack.packet_type.name
            _LOG.debug("%s: %s for unknown packet id %d", self.peer, name, packet_id)
            return
        del session.inflight[packet_id]
        self.pump()

    def _on_subscribe(self, packet: Subscribe) -> None:
        session = self._require_session()
        v5 = self._level == MQTT_5
        ids = [v for k, v in packet.properties if k == PropertyId.SUBSCRIPTION_IDENTIFIER]
        if len(ids) > 1 or 0 in ids:
            raise ProtocolViolationError("invalid subscription identifier")
        identifier = get_int_property(packet.properties, PropertyId.SUBSCRIPTION_IDENTIFIER)
        codes: list[int] = []
        wants_retained: list[_Subscription] = []
        for request in packet.subscriptions:
            topic_filter = request.topic_filter
            failure = ReasonCode.UNSPECIFIED_ERROR  # the only 3.1.1 failure code
            if topic_filter.startswith("$share/"):
                codes.append(ReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED if v5 else failure)
                continue
            if not is_valid_topic_filter(topic_filter):
                codes.append(ReasonCode.TOPIC_FILTER_INVALID if v5 else failure)
                continue
            subscription = _Subscription(
                topic_filter.split("/"),
                request.qos,
                request.no_local,
                request.retain_as_published,
                identifier,
            )
            existed = self._broker.subscribe(session, topic_filter, subscription)
            codes.append(request.qos)
            if request.retain_handling == 0 or (request.retain_handling == 1 and not existed):
                wants_retained.append(subscription)
        self._send(encode_suback(packet.packet_id, codes, self._level))
        for subscription in wants_retained:
            sub_ids = [] if subscription.identifier is None else [subscription.identifier]
            for message in self._broker._retained_matching(subscription.levels):
                qos = min(message.qos, subscription.qos)
                self.deliver(_Outbound(message, qos, True, sub_ids))

    def _on_unsubscribe(self, packet: Unsubscribe) -> None:
        session = self._require_session()
        codes = [
            ReasonCode.SUCCESS
            if self._broker.unsubscribe(session, topic_filter)
            else ReasonCode.NO_SUBSCRIPTION_EXISTED
            for topic_filter in packet.topic_filters
        ]
        self._send(encode_unsuback(packet.packet_id, codes, self._level))

    def _on_disconnect(self, packet: Disconnect) -> None:
        session = self._require_session()
        expiry = get_int_property(packet.properties, PropertyId.SESSION_EXPIRY_INTERVAL)
        if expiry is not None:
            if session.expiry_interval == 0 and expiry:
                raise ProtocolViolationError("session expiry set on DISCONNECT after 0")
            session.expiry_interval = expiry
        if packet.reason_code != ReasonCode.DISCONNECT_WITH_WILL:
            self._will = None
        self.close()

    def _require_session(self) -> _Session:
        if self._session is None:
            raise RuntimeError("packet handled before CONNECT")
        return self._session

    # -- outbound -----------------------------------------------------------

    def deliver(self, out: _Outbound) -> None:
        """Sends a message now, or queues it until the client has room."""
        stats = self._broker._stats
        if out.qos == 0:
            if self._congested():
                stats.dropped += 1
            else:
                self._send_publish(out)
            return
        session = self._require_session()
        session.queue.append(out)
        self.pump()
        if len(session.queue) > self._broker.max_queued_messages:
            session.queue.pop()  # the newest, so that what is kept stays in order
            stats.dropped += 1

    def pump(self) -> None:
        """Moves queued QoS 1/2 messages in flight while the client has room.

        Room means fewer unacknowledged messages than the client's Receive
        Maximum and a transport buffer under the limit; once the buffer
        drains, pumping resumes from a helper task.
        """
        session = self._session
        if session is None or self._closed:
            return
        while session.queue and len(session.inflight) < self._receive_maximum:
            if self._congested():
                if self._drain_task is None:
                    self._drain_task = asyncio.create_task(self._drain_then_pump())
                return
            out = session.queue.popleft()
            out.packet_id = session.next_packet_id()
            session.inflight[out.packet_id] = out
            if not self._send_publish(out):
                del session.inflight[out.packet_id]

    async def _drain_then_pump(self) -> None:
        try:
            await self._writer.drain()
        except OSError:
            return  # run() sees the broken connection and cleans up
        finally:
            self._drain_task = None
        self.pump()

    def _resume(self, session: _Session) -> None:
        """Retransmits unacknowledged messages of a resumed session (MQTT 4.4)."""
        for out in list(session.inflight.values()):
            if out.released:
                self._send(encode_ack(PacketType.PUBREL, out.packet_id, self._level))
            elif not self._send_publish(out, dup=True):
                del session.inflight[out.packet_id]
        self.pump()

    def _send_publish(self, out: _Outbound, *, dup: bool = False) -> bool:
        """Writes one PUBLISH; ``False`` if it expired or is too large to send.

        MQTT 5.0 says to treat both cases as delivered (3.3.2.3.3, 3.1.2.25).
        """
        message = out.message
        left = message.expiry_left(self._loop.time())
        if left is not None and left <= 0:
            return False
        properties: Properties = []
        if self._level == MQTT_5:
            for prop_id, value in message.properties:
                if prop_id == PropertyId.MESSAGE_EXPIRY_INTERVAL and left is not None:
                    value = left  # the subscriber sees the remaining lifetime
                properties.append((prop_id, value))
            properties += [(PropertyId.SUBSCRIPTION_IDENTIFIER, i) for i in out.subscription_ids]
        publish = Publish(
            message.topic,
            message.payload,
            out.qos,
            out.retain,
            dup,
            out.packet_id or None,
            properties,
        )
        data = encode_publish(publish, self._level)
        if len(data) > self._max_outgoing_packet:
            _LOG.debug("%s: skipping %d-byte PUBLISH over its maximum", self.peer, len(data))
            return False
        self._send(data)
        return True

    def _congested(self) -> bool:
        return self._writer.transport.get_write_buffer_size() > self._broker.write_buffer_limit

    def _send(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)
