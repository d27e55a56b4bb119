"""The MQTT client boundary: one asyncio protocol speaking MQTT 5 and 3.1.1 to the broker.

A :class:`MqttSession` is one connection. It publishes with MQTT 5 properties when the
protocol allows them (QoS 1 and 2 wait for the broker's acknowledgements), confirms
subscriptions with the broker's SUBACK codes, keeps the connection alive with PINGREQ, and
yields :class:`InboundMessage` values stamped with the monotonic time at which their bytes
came off the socket, before they wait in any queue. Socket, TLS and protocol errors are
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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit

from fleetprobe.transport.errors import ConnectError, NotAuthorizedError, SendError
from fleetprobe.transport.mqtt_codec import (
    MQTT_5,
    MQTT_311,
    Ack,
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
    encode_pingreq,
    encode_subscribe,
    encode_varint,
    get_int_property,
)

log = logging.getLogger(__name__)

UNACKNOWLEDGED = "unacknowledged"
"""The send error of a QoS 1/2 publish the broker did not acknowledge in time."""

ProtocolName = Literal["5", "3.1.1"]

# CONNACK codes that mean "wrong credentials": retrying cannot help.
_NOT_AUTHORIZED_CODES = {4, 5, 134, 135}
_MAX_PACKET_SIZE = 268_435_460  # the protocol's own limit: a 4-byte remaining length
MAX_MESSAGE_BYTES = 1 << 20
"""Received messages larger than this are not kept (see ``InboundMessage.cut_from``)."""
_INBOUND_BYTES = 256 << 20  # what received messages waiting for the application may hold
_MAX_TOPIC_BYTES = 65_535
# MQTT 3.1.1 has no Receive Maximum: keep to Mosquitto's default in-flight window (paho's
# too), past which a broker may drop incoming QoS 2 messages.
_DEFAULT_RECEIVE_MAXIMUM = 20
_SESSION_TAKEN_OVER = 0x8E
_BATCH_BYTES = 0  # at ~250 bytes a signal, a burst waits at most ~4 signals' rendering


@dataclass(frozen=True)
class BrokerTarget:
    """Where and how to connect. ``password`` never appears in ``repr`` or messages."""

    host: str
    port: int
    protocol: ProtocolName = "5"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: ssl.SSLContext | None = None
    keepalive_s: int = 30
    connect_timeout_s: float = 5.0
    ack_timeout_s: float = 10.0  # how long a QoS 1/2 publish waits for its acknowledgement

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
    before any other work; received PUBLISH packets are acknowledged here as well.
    """

    def __init__(
        self, level: int, inbound_limit: int, on_backlog: BacklogListener | None = None
    ) -> None:
        self.level = level
        self.transport: asyncio.Transport | None = None
        # A message is never buffered over MAX_MESSAGE_BYTES: a bounded read of the broker.
        self._decoder = FrameDecoder(_MAX_PACKET_SIZE, keep_at_most=MAX_MESSAGE_BYTES + 5)
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[Connack] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.close_reason = "connection lost"
        self.taken_over = False  # the broker said another client took the client id
        self.acks: dict[int, asyncio.Future[Ack]] = {}
        self.subacks: dict[int, asyncio.Future[Suback]] = {}
        self.inbound: deque[InboundMessage] = deque()
        self.inbound_limit = inbound_limit
        self.inbound_bytes = 0
        self.inbound_dropped = 0
        self.inbound_waiter: asyncio.Future[None] | None = None
        self._qos2_received: set[int] = set()
        self._writable: asyncio.Future[None] | None = None
        self._batching = False
        self._batch: list[bytes] = []
        self._batch_bytes = 0
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
        lost = SendError(f"not sent: {self.close_reason}", reason="disconnected")
        waiting: list[asyncio.Future[Ack]] | list[asyncio.Future[Suback]]
        for waiting in (list(self.acks.values()), list(self.subacks.values())):
            for future in waiting:
                if not future.done():
                    future.set_exception(lost)
        if not self.connack.done():
            self.connack.set_exception(ConnectionResetError(self.close_reason))
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
        """Send bytes: at once when nothing else went out in this turn of the event loop,
        else gathered into one write at the end of the turn (or at ``_BATCH_BYTES``).

        A burst of publishes then costs one system call per batch instead of one each
        (~15 µs on loopback), while a lone message still leaves without waiting.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            raise SendError(f"not sent: {self.close_reason}", reason="disconnected")
        self.last_write_ns = time.monotonic_ns()
        if not self._batching:
            self._batching = True
            asyncio.get_running_loop().call_soon(self.flush)
            transport.write(data)
            return
        self._batch.append(data)
        self._batch_bytes += len(data)
        if self._batch_bytes >= _BATCH_BYTES:
            self._write_batch()

    def flush(self) -> None:
        """Write what the current turn gathered; the next write goes out at once again."""
        self._write_batch()
        self._batching = False

    def _write_batch(self) -> None:
        if self._batch:
            data = b"".join(self._batch)
            self._batch.clear()
            self._batch_bytes = 0
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(data)

    async def writable(self) -> None:
        """Return once the send buffer is below its high-water mark again."""
        if self._writable is not None:
            await self._writable

    def abort(self, reason: str) -> None:
        """Close at once (no DISCONNECT): the peer broke the protocol or went silent."""
        self.close_reason = reason
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
            if packet_id in self._qos2_received:
                return False  # a resend before our PUBREC arrived: delivered once already
            self._qos2_received.add(packet_id)
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
                self._qos2_received.discard(packet.packet_id)
                self.write(encode_ack(PacketType.PUBCOMP, packet.packet_id, self.level))
                return
            future = self.acks.get(packet.packet_id)
            if future is not None and not future.done():
                future.set_result(packet)
        elif isinstance(packet, Suback):
            waiting = self.subacks.pop(packet.packet_id, None)
            if waiting is not None and not waiting.done():
                waiting.set_result(packet)
        elif isinstance(packet, Connack):
            if not self.connack.done():
                self.connack.set_result(packet)
        elif isinstance(packet, Disconnect):
            self.taken_over = packet.reason_code == _SESSION_TAKEN_OVER
            self.close_reason = (
                "session taken over by another client with the same client id"
                if packet.reason_code == _SESSION_TAKEN_OVER
                else f"the broker disconnected (reason 0x{packet.reason_code:02x})"
            )
        # PINGRESP: its arrival already counts as a read (last_read_ns).

    def _wake_reader(self) -> None:
        waiter = self.inbound_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class MqttSession:
    """One MQTT connection, used as an async context manager.

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
        self._connection: _Connection | None = None
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._ping_sent_ns = 0
        self._packet_ids = _PacketIds()
        self._in_flight = asyncio.Semaphore(_DEFAULT_RECEIVE_MAXIMUM)
        self._max_packet_size = _MAX_PACKET_SIZE
        self._keepalive_s = target.keepalive_s

    async def __aenter__(self) -> MqttSession:
        t = self.target
        try:
            async with asyncio.timeout(t.connect_timeout_s):
                connack = await self._connect()
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
            detail = _os_error_text(exc)
            if t.tls is not None and isinstance(exc, ConnectionResetError):
                # TLS 1.3 finishes the handshake before the broker checks the client's
                # certificate; a refusal then looks like a reset, so say what it may be.
                detail += (
                    "; a TLS broker does this when it requires a client certificate that "
                    "was not given (target.mqtt.tls.cert and key) or not accepted"
                )
            raise ConnectError(t.url, detail, reason=_os_reason(exc)) from None
        if connack.reason_code:
            self._drop_connection()
            detail = _connack_text(connack.reason_code, self._level)
            if connack.reason_code in _NOT_AUTHORIZED_CODES:
                raise NotAuthorizedError(
                    t.url, f"broker refused the credentials ({detail})", reason="not_authorized"
                )
            raise ConnectError(t.url, f"broker refused the connection ({detail})", reason="refused")
        self._apply_connack(connack)
        self._schedule_keepalive()
        return self

    async def _connect(self) -> Connack:
        t = self.target
        loop = asyncio.get_running_loop()
        level, limit, on_backlog = self._level, self._inbound_limit, self._on_backlog
        _, connection = await loop.create_connection(
            lambda: _Connection(level, limit, on_backlog),
            t.host,
            t.port,
            ssl=t.tls,
            server_hostname=t.host if t.tls else None,
        )
        self._connection = connection
        connection.write(
            encode_connect(
                Connect(
                    protocol_level=level,
                    clean_start=True,
                    keepalive=t.keepalive_s,
                    client_id=self.client_id,
                    username=t.username,
                    password=t.password.encode() if t.password is not None else None,
                )
            )
        )
        return await connection.connack

    def _apply_connack(self, connack: Connack) -> None:
        properties = connack.properties
        receive_maximum = get_int_property(properties, PropertyId.RECEIVE_MAXIMUM)
        if receive_maximum:
            self._in_flight = asyncio.Semaphore(receive_maximum)
        max_packet = get_int_property(properties, PropertyId.MAXIMUM_PACKET_SIZE)
        if max_packet:
            self._max_packet_size = max_packet
        server_keepalive = get_int_property(properties, PropertyId.SERVER_KEEP_ALIVE)
        if server_keepalive is not None:
            self._keepalive_s = server_keepalive

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None
        connection, self._connection = self._connection, None
        if connection is None or connection.transport is None:
            return
        if not connection.closed.done():
            with contextlib.suppress(SendError):
                connection.write(b"\xe0\x00")  # DISCONNECT, normal (both protocols)
                connection.flush()
            connection.close_reason = "closed"
            connection.transport.close()
            # A broken connection cannot say goodbye; nothing is lost by not waiting for it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await connection.closed

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
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
    def close_reason(self) -> str:
        """Why the connection ended (``connection lost``, ``closed``, the broker's reason)."""
        return self._connected().close_reason

    @property
    def taken_over(self) -> bool:
        """Whether the broker ended the session because another client connected with the
        same client id (MQTT 5 reason 0x8E; MQTT 3.1.1 brokers just close the connection)."""
        return self._connected().taken_over

    @property
    def inbound_dropped(self) -> int:
        """Messages dropped because the application fell ``inbound_limit`` behind."""
        return self._connected().inbound_dropped

    @property
    def behind_since_ns(self) -> int | None:
        """Since when the session has been behind what it received (a watched session's
        socket backlog, or messages waiting for the application); None: it is not."""
        connection = self._connection
        return None if connection is None else connection.behind_since_ns

    @property
    def inbound_waiting(self) -> int:
        """Received messages the application has not taken yet (at most ``inbound_limit``)."""
        return len(self._connected().inbound)

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
        if qos:
            async with self._in_flight:
                await self._connected().writable()
                yield
        else:
            await self._connected().writable()
            yield

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
        """Publish one message; with QoS 1 or 2, return when the broker acknowledged it.

        ``slot_held``: the caller holds a :meth:`send_slot` for it (else one is taken here).
        ``timeout_s``: how long to wait for the acknowledgement (default: the target's).

        Raises:
            SendError: not connected, an invalid topic, too large, refused, or no ack in time.
        """
        connection = self._connected()
        topic_bytes = _topic_bytes(topic)
        properties = b""
        if self._level == MQTT_5:
            properties = _publish_properties(user_properties, correlation_data)
        size = len(topic_bytes) + (2 if qos else 0) + len(properties) + len(payload)
        if size + 5 > self._max_packet_size:
            raise SendError(f"publish to {topic}: {size} bytes is too large", reason="too_large")
        if qos == 0:
            await connection.writable()
            connection.write(_publish_frame(0x30, topic_bytes, b"", properties, payload, size))
            return
        if timeout_s is None:
            timeout_s = self.target.ack_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                if slot_held:
                    await self._publish_acknowledged(
                        connection, qos, topic, topic_bytes, properties, payload, size
                    )
                    return
                async with self._in_flight:
                    await self._publish_acknowledged(
                        connection, qos, topic, topic_bytes, properties, payload, size
                    )
        except TimeoutError:
            raise SendError(
                f"publish to {topic}: no acknowledgement within {timeout_s:g}s",
                reason=UNACKNOWLEDGED,
            ) from None

    async def _publish_acknowledged(
        self,
        connection: _Connection,
        qos: int,
        topic: str,
        topic_bytes: bytes,
        properties: bytes,
        payload: bytes,
        size: int,
    ) -> None:
        packet_id = self._packet_ids.take(connection.acks)
        try:
            ack_future = connection.acks[packet_id] = asyncio.get_running_loop().create_future()
            await connection.writable()
            first = 0x30 | (qos << 1)
            connection.write(
                _publish_frame(first, topic_bytes, packet_id.to_bytes(2), properties, payload, size)
            )
            ack = await ack_future
            _check_ack(ack, topic)
            if qos == 2:
                ack_future = connection.acks[packet_id] = asyncio.get_running_loop().create_future()
                connection.write(encode_ack(PacketType.PUBREL, packet_id, self._level))
                _check_ack(await ack_future, topic)
        finally:
            connection.acks.pop(packet_id, None)

    async def subscribe(
        self, filters: Sequence[str], *, qos: int = 1, identify: bool = False
    ) -> list[int]:
        """Subscribe to every filter and return the broker's SUBACK code for each.

        Codes 0-2 are the granted QoS; 128 and up are refusals. With ``identify``
        (MQTT 5), filter ``i`` gets Subscription Identifier ``i + 1``, so each message
        says which filters matched it: a broker sends one copy per matching subscription,
        and without the identifiers the copies of overlapping filters cannot be told apart.
        """
        if identify and self._level == MQTT_5:
            return [
                (await self._subscribe([f], qos, subscription_id=i + 1))[0]
                for i, f in enumerate(filters)
            ]
        return await self._subscribe(filters, qos)

    async def _subscribe(
        self, filters: Sequence[str], qos: int, subscription_id: int | None = None
    ) -> list[int]:
        connection = self._connected()
        packet_id = self._packet_ids.take(connection.subacks)
        properties: Properties = []
        if subscription_id is not None:
            properties.append((PropertyId.SUBSCRIPTION_IDENTIFIER, subscription_id))
        packet = Subscribe(packet_id, [SubscriptionRequest(f, qos) for f in filters], properties)
        suback_future = connection.subacks[packet_id] = asyncio.get_running_loop().create_future()
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
            connection.subacks.pop(packet_id, None)
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


class _PacketIds:
    """Packet identifiers 1..65535, in turn, skipping those still in use."""

    def __init__(self) -> None:
        self._next = 0

    def take(self, in_use: Mapping[int, object]) -> int:
        for _ in range(65_535):
            self._next = self._next % 65_535 + 1
            if self._next not in in_use:
                return self._next
        raise SendError("no free packet identifier", reason="queue_full")


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


def _check_ack(ack: Ack, topic: str) -> None:
    if ack.reason_code >= 0x80:
        raise SendError(
            f"publish to {topic} refused by the broker (reason 0x{ack.reason_code:02x})",
            reason="rejected",
        )


def _connack_text(code: int, level: int) -> str:
    names = _CONNACK_311 if level == MQTT_311 else _CONNACK_5
    return f"code {code}: {names.get(code, 'refused')}"


_CONNACK_311 = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
_CONNACK_5 = {
    128: "unspecified error",
    129: "malformed packet",
    130: "protocol error",
    132: "unsupported protocol version",
    133: "client identifier not valid",
    134: "bad user name or password",
    135: "not authorized",
    136: "server unavailable",
    137: "server busy",
    138: "banned",
    140: "bad authentication method",
    149: "packet too large",
    151: "quota exceeded",
    153: "payload format invalid",
    154: "retain not supported",
    155: "QoS not supported",
    156: "use another server",
    157: "server moved",
    159: "connection rate exceeded",
}


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
    if isinstance(exc, ConnectionResetError):
        return f"the broker closed the connection before CONNACK ({exc})"
    return exc.strerror or str(exc)
