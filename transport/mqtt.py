"""The MQTT client boundary: one asyncio protocol speaking MQTT 5 and 3.1.1 to the broker.

A :class:`MqttSession` is one session over one connection at a time. It reads what the
broker announces in its CONNACK (:mod:`transport.mqtt_broker_info`) and keeps to it,
publishes with MQTT 5 properties when the protocol allows them (QoS 1 and 2 wait for the
broker's acknowledgements, each checked against its flow: :mod:`transport.mqtt_session_state`),
confirms subscriptions with the broker's SUBACK codes, keeps the connection alive with
PINGREQ, resumes a persistent session after a lost connection, and yields
:class:`InboundMessage` values stamped with the monotonic time at which their bytes came
off the socket, before they wait in any queue. Socket, TLS and protocol errors are
translated here into :mod:`transport.errors`.

Why not a general-purpose client library: on the prober's hot paths (the fleet's publishes,
the observers' receive loop) aiomqtt over paho costs ~50 µs of CPU per message and stamps
arrivals only after paho's own parsing; the probe must follow tens of thousands of signals
per second on one core, and its receive stamp is what every hop latency is measured by.
``bench/run.py`` measures both side by side.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import ssl
import termios
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit

from fleetprobe.transport.errors import ConnectError, NotAuthorizedError, SendError
from fleetprobe.transport.mqtt_broker_info import (
    CONNACK_5,
    CONNACK_311,
    DISCONNECT_NAMES,
    NOT_AUTHORIZED_CODES,
    BrokerCapabilities,
    describe,
)
from fleetprobe.transport.mqtt_codec import (
    MQTT_5,
    MQTT_311,
    Ack,
    Auth,
    Connack,
    Connect,
    Disconnect,
    FrameDecoder,
    MqttError,
    PacketTooLargeError,
    PacketType,
    Properties,
    PropertyId,
    Publish,
    RawPacket,
    Suback,
    Subscribe,
    SubscriptionRequest,
    decode_publish_head,
    decode_server_packet,
    encode_ack,
    encode_connect,
    encode_disconnect,
    encode_pingreq,
    encode_subscribe,
    encode_varint,
)
from fleetprobe.transport.mqtt_session_state import Outbound, SessionState

log = logging.getLogger(__name__)

UNACKNOWLEDGED = "unacknowledged"
"""The send error of a QoS 1/2 publish the broker did not acknowledge in time."""
QOS_NOT_SUPPORTED = "qos_not_supported"
"""The send error of a publish above the broker's Maximum QoS (without ``downgrade_qos``)."""

ProtocolName = Literal["5", "3.1.1"]

_MAX_PACKET_SIZE = 268_435_460  # the protocol's own limit: a 4-byte remaining length
MAX_MESSAGE_BYTES = 1 << 20
"""Received messages larger than this are not kept (see ``InboundMessage.cut_from``)."""
_INBOUND_BYTES = 256 << 20  # what received messages waiting for the application may hold
_MAX_TOPIC_BYTES = 65_535
DEFAULT_INFLIGHT_311 = 20
"""MQTT 3.1.1 brokers announce no in-flight window: keep to Mosquitto's default (paho's
too), past which Mosquitto drops incoming QoS 2 messages it has already acknowledged."""
_RECEIVE_MAXIMUM_5 = 65_535  # MQTT 5's default when the broker announces none
_SESSION_TAKEN_OVER = 0x8E
_DISCONNECT_NORMAL = b"\xe0\x00"  # both protocols
_NOT_CONNECTED_YET = BrokerCapabilities()  # a session's capabilities before any CONNACK


@dataclass(frozen=True)
class BrokerTarget:
    """Where and how to connect. ``password`` never appears in ``repr`` or messages.

    ``session_expiry_s``: None for clean sessions; else sessions persist (clean start off
    after the first connect) and the broker keeps them that long while disconnected.
    ``inflight``: QoS 1/2 publishes one session may leave unacknowledged (default: the
    broker's Receive Maximum in MQTT 5, ``DEFAULT_INFLIGHT_311`` in 3.1.1).
    ``downgrade_qos``: publish above the broker's Maximum QoS at that maximum instead of
    refusing.
    """

    host: str
    port: int
    protocol: ProtocolName = "5"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: ssl.SSLContext | None = None
    keepalive_s: int = 30
    connect_timeout_s: float = 5.0
    ack_timeout_s: float = 10.0  # how long a QoS 1/2 publish waits for its acknowledgement
    session_expiry_s: int | None = None
    inflight: int | None = None
    downgrade_qos: bool = False

    @property
    def url(self) -> str:
        """The broker's address as users wrote it, without credentials."""
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """Split ``mqtt://host:port`` or ``mqtts://host:port`` into host, port and TLS flag."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"scheme must be mqtt:// or mqtts://, not {parts.scheme or 'none'}://")
    if not parts.hostname:
        raise ValueError("the URL names no host")
    if parts.username or parts.password:
        raise ValueError("put credentials in username/password, not in the URL")
    if parts.path not in ("", "/"):
        raise ValueError("an MQTT URL has no path")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port must be a number from 1 to 65535") from None
    return parts.hostname, port or (8883 if tls else 1883), tls


def make_tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """A client TLS context that verifies the broker (against ``ca`` when given)."""
    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    return context


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A message as the observer sees it.

    Attributes:
        seen_ns: ``time.monotonic_ns()`` when its bytes were read from the socket.
    """

    topic: str
    payload: bytes
    retain: bool
    user_properties: tuple[tuple[str, str], ...]
    correlation_data: bytes | None
    seen_ns: int
    subscription_ids: tuple[int, ...] = ()  # MQTT 5: which subscriptions matched it
    cut_from: int = 0
    """Nonzero for a message over ``MAX_MESSAGE_BYTES``: its size; its payload was dropped
    as it arrived (``payload`` is empty), only its topic kept."""


BacklogListener = Callable[[int, "int | None"], None]
"""Told ``(since_ns, None)`` when a session falls behind what the broker delivers (bytes
are left in its socket after a read, or its queue overflows) and ``(since_ns, end_ns)``
when it has caught up again: until ``end_ns`` its stamps may be late, and a broker may
drop what a subscriber that far behind cannot take."""


class _Connection(asyncio.Protocol):
    """The bytes of one MQTT connection: frames in, packets out, flow control.

    Everything runs in ``data_received`` on the event loop, so an arrival is stamped
    before any other work; received PUBLISH packets are acknowledged here as well, and
    acknowledgements advance the session's flows (:class:`SessionState`) here too.
    """

    def __init__(
        self,
        level: int,
        state: SessionState,
        inbound_limit: int,
        on_backlog: BacklogListener | None = None,
    ) -> None:
        self.level = level
        self.state = state
        self.transport: asyncio.Transport | None = None
        # A message is never buffered over MAX_MESSAGE_BYTES: a bounded read of the broker.
        self._decoder = FrameDecoder(_MAX_PACKET_SIZE, keep_at_most=MAX_MESSAGE_BYTES + 5)
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[Connack] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.close_reason = "connection lost"
        self.disconnect_code: int | None = None  # the reason of the broker's DISCONNECT
        self.aborted = False  # closed by us, for a reason of the broker's (close_reason)
        self.inbound: deque[InboundMessage] = deque()
        self.inbound_limit = inbound_limit
        self.inbound_bytes = 0
        self.inbound_dropped = 0
        self.inbound_waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self.last_write_ns = self.last_read_ns = time.monotonic_ns()
        self._on_backlog = on_backlog
        self._fd = -1  # the socket, when its backlog is watched
        self._unread = array.array("i", [0])
        self._drained_ns = self.last_read_ns  # when a read last left nothing behind
        self._backlog_since: int | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Nagle's algorithm holds small writes back for up to ~40 ms on loopback.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._on_backlog is not None:
                self._fd = sock.fileno()

    def data_received(self, data: bytes) -> None:
        seen_ns = self.last_read_ns = time.monotonic_ns()
        if self._fd >= 0:
            self._note_backlog(seen_ns)
        decoder = self._decoder
        decoder.feed(data)
        try:
            while (raw := decoder.next_packet()) is not None:
                if raw.cut_from:
                    self._on_cut(raw, seen_ns)
                    continue
                packet = decode_server_packet(raw.first_byte, raw.body, self.level)
                if isinstance(packet, Publish):
                    self._on_publish(packet, seen_ns)
                else:
                    self._on_control(packet)
        except MqttError as error:
            self.abort(f"the broker sent a malformed packet ({error})")
        except SendError:
            pass  # closing: the acknowledgement cannot go out, and the broker will resend

    def _note_backlog(self, read_ns: int) -> None:
        """Whether this read left bytes in the socket (checked before the read is parsed,
        so that what arrives meanwhile is not taken for a backlog): ~0.2 µs a read."""
        try:
            fcntl.ioctl(self._fd, termios.FIONREAD, self._unread)
        except OSError:
            return  # closing
        assert self._on_backlog is not None
        if self._unread[0]:
            if self._backlog_since is None:
                # Seen now; a loop held up before (whose reads are late) is a stall span.
                self._backlog_since = read_ns
                self._on_backlog(read_ns, None)
            return
        if self._backlog_since is not None:
            self._on_backlog(self._backlog_since, read_ns)
            self._backlog_since = None
        self._drained_ns = read_ns

    @property
    def behind_since_ns(self) -> int | None:
        """Since when the session has been behind (bytes waiting in its socket, or
        messages in its queue); None when it has taken in everything it received."""
        # Bytes left in the socket may have waited since the last read that drained it.
        since = None if self._backlog_since is None else self._drained_ns
        if self.inbound:
            oldest = self.inbound[0].seen_ns - 1
            since = oldest if since is None else min(since, oldest)
        return since

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.close_reason == "connection lost":
            self.close_reason = f"connection lost ({exc})"
        if self._backlog_since is not None and self._on_backlog is not None:
            self._on_backlog(self._backlog_since, time.monotonic_ns())  # nothing more to read
            self._backlog_since = None
        self.state.connection_lost(
            SendError(f"not sent: {self.close_reason}", reason="disconnected")
        )
        if not self.connack.done():
            # Our own abort (the broker broke the protocol) is not the broker hanging up.
            lost = ConnectionAbortedError if self.aborted else ConnectionResetError
            self.connack.set_exception(lost(self.close_reason))
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake_reader()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # Sending

    def write(self, data: bytes) -> None:
        """Hand bytes to the socket now (asyncio buffers what the kernel cannot take yet).

        Raises:
            SendError: the connection is closing or gone.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            raise SendError(f"not sent: {self.close_reason}", reason="disconnected")
        self.last_write_ns = time.monotonic_ns()
        transport.write(data)

    async def writable(self) -> None:
        """Return once the send buffer is below its high-water mark again."""
        if self._writable is not None:
            await self._writable

    def abort(self, reason: str) -> None:
        """Close at once (no DISCONNECT): the peer broke the protocol or went silent."""
        self.close_reason = reason
        self.aborted = True
        if self.transport is not None:
            self.transport.abort()

    # Receiving

    def _on_publish(self, packet: Publish, seen_ns: int) -> None:
        if not self._acknowledge(packet.qos, packet.packet_id):
            return
        if self._queue_is_full(len(packet.payload)):
            return
        user_properties: list[tuple[str, str]] = []
        correlation: bytes | None = None
        subscription_ids: list[int] = []
        for key, value in packet.properties:
            if key == PropertyId.USER_PROPERTY and isinstance(value, tuple):
                user_properties.append(value)
            elif key == PropertyId.CORRELATION_DATA and isinstance(value, bytes):
                correlation = value
            elif key == PropertyId.SUBSCRIPTION_IDENTIFIER and isinstance(value, int):
                subscription_ids.append(value)
        self._enqueue(
            InboundMessage(
                packet.topic,
                packet.payload,
                packet.retain,
                tuple(user_properties),
                correlation,
                seen_ns,
                tuple(subscription_ids),
            )
        )

    def _on_cut(self, raw: RawPacket, seen_ns: int) -> None:
        """A packet too large to keep: a PUBLISH is acknowledged and passed on with its
        topic only, so that it is counted where it was meant to be seen."""
        if raw.packet_type != PacketType.PUBLISH:
            raise PacketTooLargeError(f"a control packet of {raw.cut_from} bytes")
        topic, qos, packet_id = decode_publish_head(raw.first_byte, raw.body)
        if self._acknowledge(qos, packet_id) and not self._queue_is_full(0):
            retain = bool(raw.first_byte & 0x01)
            self._enqueue(InboundMessage(topic, b"", retain, (), None, seen_ns, (), raw.cut_from))

    def _acknowledge(self, qos: int, packet_id: int | None) -> bool:
        """Ack a received PUBLISH; False for a QoS 2 resend already delivered."""
        if qos == 2:
            packet_id = packet_id or 0
            self.write(encode_ack(PacketType.PUBREC, packet_id, self.level))
            received = self.state.qos2_received
            if packet_id in received:
                return False  # a resend before our PUBREC arrived: delivered once already
            received.add(packet_id)
        elif qos == 1:
            self.write(encode_ack(PacketType.PUBACK, packet_id or 0, self.level))
        return True

    def _queue_is_full(self, size: int) -> bool:
        if len(self.inbound) >= self.inbound_limit or self.inbound_bytes + size > _INBOUND_BYTES:
            self.inbound_dropped += 1
            if self._on_backlog is not None and self.inbound:
                # Lost here: blind from the oldest message still waiting until now.
                self._on_backlog(self.inbound[0].seen_ns, self.last_read_ns)
            return True
        return False

    def _enqueue(self, message: InboundMessage) -> None:
        self.inbound.append(message)
        self.inbound_bytes += len(message.payload)
        self._wake_reader()

    def _on_control(self, packet: object) -> None:
        if isinstance(packet, Ack):
            if packet.packet_type == PacketType.PUBREL:
                self.state.qos2_received.discard(packet.packet_id)
                self.write(encode_ack(PacketType.PUBCOMP, packet.packet_id, self.level))
                return
            self.state.on_ack(packet, self.write, self.level)
        elif isinstance(packet, Suback):
            waiting = self.state.subacks.pop(packet.packet_id, None)
            if waiting is not None and not waiting.done():
                waiting.set_result(packet)
        elif isinstance(packet, Connack):
            if not self.connack.done():
                self.connack.set_result(packet)
        elif isinstance(packet, Disconnect):
            self.disconnect_code = packet.reason_code
            self.close_reason = (
                "session taken over by another client with the same client id"
                if packet.reason_code == _SESSION_TAKEN_OVER
                else "the broker disconnected ("
                + describe(packet.reason_code, packet.properties, DISCONNECT_NAMES)
                + ")"
            )
        elif isinstance(packet, Auth):
            # Only a client that asked for enhanced authentication may get AUTH; this one
            # never asks, so say what the broker wanted instead of a bare protocol error.
            self.abort(
                "the broker asked for enhanced authentication (AUTH, "
                + describe(packet.reason_code, packet.properties, {0x18: "continue"})
                + "), which fleetprobe does not offer"
            )
        # PINGRESP: its arrival already counts as a read (last_read_ns).

    def _wake_reader(self) -> None:
        waiter = self.inbound_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class MqttSession:
    """One MQTT session over one connection at a time, used as an async context manager.

    :meth:`reconnect` opens a new connection for the same session after a loss: with a
    persistent session (``target.session_expiry_s``) the broker's state is resumed and
    every unfinished flow sent again; otherwise it starts clean.

    Args:
        target: the broker.
        client_id: the MQTT client identifier (a VIN for per-vehicle sessions); a random
            one when None.
        inbound_limit: how many received messages may wait for the application; past it
            messages are dropped and counted in ``inbound_dropped``.
        on_backlog: told when the session falls behind the broker and catches up again
            (:data:`BacklogListener`); None: not watched.
    """

    def __init__(
        self,
        target: BrokerTarget,
        client_id: str | None = None,
        *,
        inbound_limit: int = 100_000,
        on_backlog: BacklogListener | None = None,
    ) -> None:
        self.target = target
        self.client_id = client_id or f"fleetprobe-{os.urandom(6).hex()}"
        self._inbound_limit = inbound_limit
        self._on_backlog = on_backlog
        self._level = MQTT_5 if target.protocol == "5" else MQTT_311
        self._connection: _Connection | None = None  # set once its CONNACK is applied
        self._opening: _Connection | None = None  # waiting for its CONNACK
        self._state = SessionState(
            persistent=target.session_expiry_s is not None,
            window=target.inflight or DEFAULT_INFLIGHT_311,
        )
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._ping_sent_ns = 0
        self._max_packet_size = _MAX_PACKET_SIZE
        self._keepalive_s = target.keepalive_s
        self._dropped_before = 0  # inbound_dropped of earlier connections
        self.broker = _NOT_CONNECTED_YET
        """What the broker announced in its last CONNACK."""
        self.session_present = False
        """Whether the last CONNACK resumed a session the broker kept."""
        self.resent = 0
        """Unfinished flows sent again after resuming the session, over its lifetime."""

    async def __aenter__(self) -> MqttSession:
        if self._state.persistent:
            # First wipe what an earlier run of this client id left (packet ids the broker
            # still holds would swallow new publishes), then start the session with clean
            # start off: Mosquitto 2.0 saves no session begun with clean start on, even
            # an MQTT 5 one with a Session Expiry, so it would not survive a restart.
            await self._open(clean_start=True, keep=False)
            await self.disconnect(end_session=False)
        await self._open(clean_start=not self._state.persistent)
        return self

    async def reconnect(self) -> None:
        """Connect again after the connection was lost (or closed with ``end_session``
        False); a persistent session resumes where the broker kept it.

        Raises:
            ConnectError: as when entering.
        """
        self._drop_connection()
        await self._open(clean_start=not self._state.persistent)

    async def _open(self, *, clean_start: bool, keep: bool = True) -> None:
        """Connect; ``keep`` False asks for no Session Expiry (the session ends with the
        connection)."""
        t = self.target
        try:
            async with asyncio.timeout(t.connect_timeout_s):
                connack = await self._connect(clean_start, keep)
        except TimeoutError:
            self._drop_connection()
            raise ConnectError(t.url, "no answer in time", reason="timeout") from None
        except ssl.SSLError as exc:
            self._drop_connection()
            raise ConnectError(t.url, f"TLS failed: {exc}", reason="tls") from None
        except socket.gaierror as exc:
            raise ConnectError(t.url, f"name not resolved ({exc})", reason="dns") from None
        except asyncio.CancelledError:
            self._drop_connection()  # cancelled while waiting for CONNACK: no socket left open
            raise
        except OSError as exc:
            self._drop_connection()
            # RabbitMQ before 3.13 closes on an MQTT 5 CONNECT without a word. Asked on the
            # first connect only: a broker that spoke MQTT 5 before is restarting.
            if (
                isinstance(exc, ConnectionResetError)
                and self._level == MQTT_5
                and self.broker is _NOT_CONNECTED_YET
                and await speaks_only_311(t, self.client_id)
            ):
                raise _only_311(
                    t, "it closed the connection on an MQTT 5 CONNECT and answered a 3.1.1 one"
                ) from None
            detail = _os_error_text(exc)
            if t.tls is not None and isinstance(exc, ConnectionResetError):
                # TLS 1.3 finishes the handshake before the broker checks the client's
                # certificate; a refusal then looks like a reset, so say what it may be.
                detail += (
                    "; a TLS broker does this when it requires a client certificate that "
                    "was not given (target.mqtt.tls.cert and key) or not accepted"
                )
            raise ConnectError(t.url, detail, reason=_os_reason(exc)) from None
        if connack.answered_311:
            self._drop_connection()
            raise _only_311(t, "it answered an MQTT 5 CONNECT in MQTT 3.1.1")
        if connack.reason_code:
            self._drop_connection()
            names = CONNACK_311 if self._level == MQTT_311 else CONNACK_5
            detail = describe(connack.reason_code, connack.properties, names)
            if connack.reason_code in NOT_AUTHORIZED_CODES:
                raise NotAuthorizedError(
                    t.url, f"broker refused the credentials ({detail})", reason="not_authorized"
                )
            raise ConnectError(t.url, f"broker refused the connection ({detail})", reason="refused")
        connection, self._opening = self._opening, None
        assert connection is not None
        try:
            self._apply_connack(connection, connack)
        except SendError:  # it closed right after its CONNACK, before the resends went out
            connection.abort(connection.close_reason)
            raise ConnectError(
                t.url,
                f"lost right after CONNACK ({connection.close_reason})",
                reason="disconnected",
            ) from None
        self._connection = connection  # publishes go out on it from now on, not before
        self._schedule_keepalive()

    async def _connect(self, clean_start: bool, keep: bool) -> Connack:
        t = self.target
        loop = asyncio.get_running_loop()
        level, state = self._level, self._state
        limit, on_backlog = self._inbound_limit, self._on_backlog
        _, connection = await loop.create_connection(
            lambda: _Connection(level, state, limit, on_backlog),
            t.host,
            t.port,
            ssl=t.tls,
            server_hostname=t.host if t.tls else None,
        )
        self._opening = connection
        properties: Properties = []
        if level == MQTT_5 and t.session_expiry_s and keep:
            properties.append((PropertyId.SESSION_EXPIRY_INTERVAL, t.session_expiry_s))
        connection.write(_connect_packet(t, self.client_id, level, clean_start, properties))
        return await connection.connack

    def _apply_connack(self, connection: _Connection, connack: Connack) -> None:
        """Take in what the CONNACK says; resume (resend) or forget the session's flows.

        Raises:
            SendError: the connection closed before the resends could go out.
        """
        self.broker = broker = BrokerCapabilities.from_connack(connack.properties, self._level)
        if broker.assigned_client_id:
            self.client_id = broker.assigned_client_id  # the session's name from now on
        window = self.target.inflight or DEFAULT_INFLIGHT_311
        if self._level == MQTT_5:
            announced = broker.receive_maximum or _RECEIVE_MAXIMUM_5
            window = min(self.target.inflight or announced, announced)
        state = self._state
        state.window.resize(window)
        self._max_packet_size = broker.maximum_packet_size or _MAX_PACKET_SIZE
        # A CONNACK without Server Keep Alive means the CONNECT's (after a failover too).
        announced_keepalive = broker.server_keep_alive
        self._keepalive_s = (
            self.target.keepalive_s if announced_keepalive is None else announced_keepalive
        )
        self.session_present = connack.session_present
        if not state.persistent:
            return
        if connack.session_present:
            self.resent += state.resume(connection.write, self._level)
        else:  # the broker has no state of ours: nor may we (MQTT 5 3.2.2.1.1)
            state.discard(
                SendError(
                    "not acknowledged: the broker came back without the session "
                    "(restarted without persistence?)",
                    reason="session_lost",
                )
            )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    async def disconnect(self, *, end_session: bool = True) -> None:
        """Say goodbye and close. ``end_session``: a persistent session ends too (MQTT 5:
        Session Expiry 0 in the DISCONNECT; else, as when the connection was already lost
        or in 3.1.1, a clean connect that discards it), so the broker keeps nothing for a
        client that will not come back, and unfinished publishes fail now."""
        connection = self._take_connection()
        persistent = self._state.persistent
        ended = False  # the broker was told to end the session
        transport = connection.transport if connection is not None else None
        if connection is not None and transport is not None and not connection.closed.done():
            goodbye = _DISCONNECT_NORMAL
            if persistent and end_session and self._level == MQTT_5:
                goodbye = encode_disconnect(0, [(PropertyId.SESSION_EXPIRY_INTERVAL, 0)])
                ended = True
            with contextlib.suppress(SendError):
                connection.write(goodbye)
            connection.close_reason = "closed"
            transport.close()
            # A broken connection cannot say goodbye; nothing is lost by not waiting.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await connection.closed
        if persistent and end_session:
            self.forget_flows("not sent: closed", "disconnected")
            if not ended:
                with contextlib.suppress(ConnectError, OSError):
                    await self._open(clean_start=True, keep=False)
                    await self.disconnect(end_session=False)

    def forget_flows(self, message: str, reason: str) -> None:
        """Fail every unfinished publish with ``SendError(message, reason)`` (a persistent
        session keeps them over a lost connection, for a reconnect that will not come)."""
        self._state.discard(SendError(message, reason=reason))

    def _take_connection(self) -> _Connection | None:
        """Stop using the connection (one still waiting for its CONNACK is aborted) and
        return it, its dropped messages counted."""
        opening, self._opening = self._opening, None
        if opening is not None and opening.transport is not None:
            opening.transport.abort()
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None
        connection, self._connection = self._connection, None
        if connection is not None:
            self._dropped_before += connection.inbound_dropped
        return connection

    def _drop_connection(self) -> None:
        connection = self._take_connection()
        if connection is not None and connection.transport is not None:
            connection.transport.abort()

    def _schedule_keepalive(self) -> None:
        # A timer, not a task per session: 10,000 sessions' keepalive tasks waking together
        # cost the loop enough to show as emission lag.
        if self._keepalive_s:
            loop = asyncio.get_running_loop()
            self._keepalive_timer = loop.call_later(self._keepalive_s / 2, self._keep_alive)

    def _keep_alive(self) -> None:
        """PINGREQ when we have not written, or not heard from the broker, for half the
        keepalive; give up when a ping stays unanswered for a whole keepalive.

        Not hearing is reason enough to ping: a fleet session that only publishes at QoS 0
        writes all the time and would otherwise never learn that the broker went silent.
        """
        connection = self._connection
        if connection is None or connection.closed.done():
            return
        now = time.monotonic_ns()
        keepalive_ns = self._keepalive_s * 1_000_000_000
        unanswered = self._ping_sent_ns > connection.last_read_ns
        if unanswered and now - self._ping_sent_ns >= keepalive_ns:
            connection.abort("no answer from the broker within its keepalive")
            return
        idle_ns = now - min(connection.last_write_ns, connection.last_read_ns)
        if not unanswered and idle_ns >= keepalive_ns // 2:
            with contextlib.suppress(SendError):
                connection.write(encode_pingreq())
                self._ping_sent_ns = now
        self._schedule_keepalive()

    async def wait_disconnected(self) -> None:
        """Return when the connection is lost (or closed)."""
        await asyncio.shield(self._connected().closed)

    @property
    def connected(self) -> bool:
        """Whether the session's connection is open."""
        connection = self._connection
        return connection is not None and not connection.closed.done()

    @property
    def close_reason(self) -> str:
        """Why the connection ended (``connection lost``, ``closed``, the broker's reason)."""
        return self._connected().close_reason

    @property
    def disconnect_code(self) -> int | None:
        """The reason code of the broker's DISCONNECT (MQTT 5) that ended the connection;
        None when it gave none (3.1.1 brokers just close)."""
        return self._connected().disconnect_code

    @property
    def inbound_dropped(self) -> int:
        """Messages dropped because the application fell ``inbound_limit`` behind, over
        every connection of the session."""
        connection = self._connection
        return self._dropped_before + (connection.inbound_dropped if connection else 0)

    @property
    def behind_since_ns(self) -> int | None:
        """Since when the session has been behind what it received (a watched session's
        socket backlog, or messages waiting for the application); None: it is not."""
        connection = self._connection
        return None if connection is None else connection.behind_since_ns

    @property
    def inbound_waiting(self) -> int:
        """Received messages the application has not taken yet (at most ``inbound_limit``)."""
        connection = self._connection
        return 0 if connection is None else len(connection.inbound)

    async def writable(self) -> None:
        """Return once the connection has room for more bytes (its send buffer is below
        the high-water mark)."""
        await self._connected().writable()

    @contextlib.asynccontextmanager
    async def send_slot(self, qos: int) -> AsyncIterator[None]:
        """Hold room to send one QoS ``qos`` message now: a free in-flight slot (the
        broker's Receive Maximum) for QoS 1 and 2, and a writable connection. A sender that
        stamps its message inside it starts the message's clock when the bytes can leave:
        the wait here is the sender's own, never the broker's. Publish inside with
        ``slot_held=True``."""
        if not qos:
            await self._connected().writable()
            yield
            return
        window = self._state.window
        await window.acquire()
        try:
            await self._connected().writable()
            yield
        finally:
            window.release()

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        user_properties: Sequence[tuple[str, str]] = (),
        correlation_data: bytes | None = None,
        timeout_s: float | None = None,
        slot_held: bool = False,
    ) -> None:
        """Publish one message; with QoS 1 or 2, return when the broker completed it.

        ``slot_held``: the caller holds a :meth:`send_slot` for it (else one is taken here).
        ``timeout_s``: how long to wait for the acknowledgement (default: the target's).
        A QoS above the broker's Maximum QoS is refused, or lowered to it with
        ``target.downgrade_qos``.

        Raises:
            SendError: not connected, an invalid topic, too large, refused, answered out of
                protocol, or not acknowledged in time.
        """
        if qos > self.broker.maximum_qos:
            qos = self._allowed_qos(topic, qos)
        topic_bytes = _topic_bytes(topic)
        properties = b""
        if self._level == MQTT_5:
            properties = _publish_properties(user_properties, correlation_data)
        size = len(topic_bytes) + (2 if qos else 0) + len(properties) + len(payload)
        if size + 5 > self._max_packet_size:
            raise SendError(f"publish to {topic}: {size} bytes is too large", reason="too_large")
        if qos == 0:
            connection = self._connected()
            await connection.writable()
            connection.write(_publish_frame(0x30, topic_bytes, b"", properties, payload, size))
            return
        if timeout_s is None:
            timeout_s = self.target.ack_timeout_s
        window = self._state.window
        try:
            async with asyncio.timeout(timeout_s):
                if not slot_held:
                    await window.acquire()
                try:
                    await self._publish_acknowledged(
                        qos, topic, topic_bytes, properties, payload, size
                    )
                finally:
                    if not slot_held:
                        window.release()
        except TimeoutError:
            raise SendError(
                f"publish to {topic}: no acknowledgement within {timeout_s:g}s",
                reason=UNACKNOWLEDGED,
            ) from None

    def _allowed_qos(self, topic: str, qos: int) -> int:
        maximum = self.broker.maximum_qos
        if self.target.downgrade_qos:
            return maximum
        raise SendError(
            f"publish to {topic}: QoS {qos} asked, but the broker allows at most QoS "
            f"{maximum} (its CONNACK's Maximum QoS)",
            reason=QOS_NOT_SUPPORTED,
        )

    async def _publish_acknowledged(
        self,
        qos: int,
        topic: str,
        topic_bytes: bytes,
        properties: bytes,
        payload: bytes,
        size: int,
    ) -> None:
        await self._connected().writable()
        connection = self._connected()  # read after every wait: it may have reconnected
        state = self._state
        packet_id = state.take_packet_id()
        frame = _publish_frame(
            0x30 | (qos << 1), topic_bytes, packet_id.to_bytes(2), properties, payload, size
        )
        done = asyncio.get_running_loop().create_future()
        expect = PacketType.PUBACK if qos == 1 else PacketType.PUBREC
        state.outbound[packet_id] = Outbound(topic, qos, frame, expect, done)
        try:
            connection.write(frame)
        except SendError:
            del state.outbound[packet_id]  # never sent: nothing to resend or to hold
            raise
        try:
            await done
        except asyncio.CancelledError:
            # Timed out: the entry keeps its id, and its window slot, until the broker
            # completes the flow or the session ends, since the broker may still hold it.
            state.abandoned(packet_id)
            raise

    async def subscribe(
        self, filters: Sequence[str], *, qos: int = 1, identify: bool = False
    ) -> list[int]:
        """Subscribe to every filter and return the broker's SUBACK code for each.

        Codes 0-2 are the granted QoS; 128 and up are refusals. With ``identify``
        (MQTT 5, where the broker offers Subscription Identifiers), filter ``i`` gets
        Subscription Identifier ``i + 1``, so each message says which filters matched it:
        a broker sends one copy per matching subscription, and without the identifiers the
        copies of overlapping filters cannot be told apart.
        """
        if identify and self._level == MQTT_5 and self.broker.subscription_identifiers:
            return [
                (await self._subscribe([f], qos, subscription_id=i + 1))[0]
                for i, f in enumerate(filters)
            ]
        return await self._subscribe(filters, qos)

    async def _subscribe(
        self, filters: Sequence[str], qos: int, subscription_id: int | None = None
    ) -> list[int]:
        connection = self._connected()
        state = self._state
        packet_id = state.take_packet_id()
        properties: Properties = []
        if subscription_id is not None:
            properties.append((PropertyId.SUBSCRIPTION_IDENTIFIER, subscription_id))
        packet = Subscribe(packet_id, [SubscriptionRequest(f, qos) for f in filters], properties)
        suback_future = state.subacks[packet_id] = asyncio.get_running_loop().create_future()
        try:
            connection.write(encode_subscribe(packet, self._level))
            async with asyncio.timeout(self.target.connect_timeout_s):
                suback: Suback = await suback_future
        except (SendError, TimeoutError) as exc:
            detail = "no SUBACK in time" if isinstance(exc, TimeoutError) else str(exc)
            raise ConnectError(
                self.target.url, f"subscribe failed: {detail}", reason="disconnected"
            ) from None
        finally:
            state.subacks.pop(packet_id, None)
        return suback.reason_codes

    async def messages(self) -> AsyncIterator[InboundMessage]:
        """Received messages in arrival order, until the connection ends.

        Raises:
            ConnectError: the connection was lost.
        """
        connection = self._connected()
        inbound = connection.inbound
        while True:
            while inbound:
                message = inbound.popleft()
                connection.inbound_bytes -= len(message.payload)
                yield message
            if connection.closed.done():
                raise ConnectError(self.target.url, connection.close_reason, reason="disconnected")
            connection.inbound_waiter = asyncio.get_running_loop().create_future()
            await connection.inbound_waiter

    def _connected(self) -> _Connection:
        if self._connection is None:
            # Not entered yet, or the connection dropped (keepalive, the broker went away):
            # either way nothing can be sent, and a sender counts that, never crashes.
            raise SendError(f"{self.target.url}: not connected", reason="disconnected")
        return self._connection


def _connect_packet(
    target: BrokerTarget, client_id: str, level: int, clean_start: bool, properties: Properties
) -> bytes:
    # An empty user name or password (``${FLEET_MQTT_USER:-}`` left unset) is none at all:
    # brokers such as RabbitMQ refuse a zero-length user name.
    return encode_connect(
        Connect(
            protocol_level=level,
            clean_start=clean_start,
            keepalive=target.keepalive_s,
            client_id=client_id,
            username=target.username or None,
            password=target.password.encode() if target.password else None,
            properties=properties,
        )
    )


async def speaks_only_311(target: BrokerTarget, client_id: str) -> bool:
    """Whether the broker answers an MQTT 3.1.1 CONNECT (on a connection of its own, with
    its own client id, closed at once): asked after it hung up on an MQTT 5 one."""
    probe_id = f"{client_id[:40]}-probe-{os.urandom(2).hex()}"
    packet = _connect_packet(target, probe_id, MQTT_311, True, [])
    try:
        async with asyncio.timeout(target.connect_timeout_s):
            reader, writer = await asyncio.open_connection(
                target.host,
                target.port,
                ssl=target.tls,
                server_hostname=target.host if target.tls else None,
            )
            try:
                writer.write(packet)
                answer = await reader.readexactly(4)
                with contextlib.suppress(OSError):
                    writer.write(_DISCONNECT_NORMAL)
            finally:
                writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
        return False
    return answer[:2] == b"\x20\x02"


def _only_311(target: BrokerTarget, what: str) -> ConnectError:
    return ConnectError(
        target.url,
        f"the broker does not speak MQTT 5 ({what}); set target.mqtt.protocol: 3.1.1",
        reason="protocol",
    )


def _topic_bytes(topic: str) -> bytes:
    """A topic name as it goes on the wire, or SendError(reason="invalid")."""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise SendError(f"publish to {topic!r} refused: not a valid topic name", reason="invalid")
    try:
        encoded = topic.encode("utf-8")
    except UnicodeEncodeError:
        raise SendError(
            f"publish to {topic!r} refused: not valid UTF-8", reason="invalid"
        ) from None
    if len(encoded) > _MAX_TOPIC_BYTES:
        raise SendError(
            f"publish refused: topic of {len(encoded)} bytes (at most 65535)", reason="invalid"
        )
    return len(encoded).to_bytes(2) + encoded


def _publish_properties(
    user_properties: Sequence[tuple[str, str]], correlation_data: bytes | None
) -> bytes:
    """The MQTT 5 property block of a PUBLISH (its length first)."""
    body = bytearray()
    for key, value in user_properties:
        k, v = key.encode(), value.encode()
        body += b"\x26" + len(k).to_bytes(2) + k + len(v).to_bytes(2) + v
    if correlation_data:
        body += b"\x09" + len(correlation_data).to_bytes(2) + correlation_data
    return encode_varint(len(body)) + body


def _publish_frame(
    first: int, topic: bytes, packet_id: bytes, properties: bytes, payload: bytes, size: int
) -> bytes:
    return b"".join((bytes((first,)), encode_varint(size), topic, packet_id, properties, payload))


def _os_reason(exc: OSError) -> str:
    """A bounded reason label for a socket error."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "disconnected"
    if "unreachable" in str(exc).lower():
        return "unreachable"
    return "error"


def _os_error_text(exc: OSError) -> str:
    if isinstance(exc, ConnectionAbortedError):
        return str(exc)
    if isinstance(exc, ConnectionResetError):
        return f"the broker closed the connection before CONNACK ({exc})"
    return exc.strerror or str(exc)
