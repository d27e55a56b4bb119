"""The MQTT client boundary: the one module that imports aiomqtt (and paho under it).

A :class:`MqttSession` is one connection to the broker. It publishes with MQTT 5
properties when the protocol allows them, confirms subscriptions with the broker's
SUBACK codes, and yields :class:`InboundMessage` values stamped with the monotonic time
at which the client parsed them, before they wait in any queue. aiomqtt and paho errors
are translated here into :mod:`transport.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from transport.errors import ConnectError, NotAuthorizedError, SendError

log = logging.getLogger(__name__)

ProtocolName = Literal["5", "3.1.1"]

# CONNACK codes that mean "wrong credentials": retrying cannot help.
_NOT_AUTHORIZED_CODES = {4, 5, 134, 135}
# Nagle's algorithm holds small writes back for up to ~40 ms on loopback.
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
        seen_ns: ``time.monotonic_ns()`` when the client parsed the packet.
    """

    topic: str
    payload: bytes
    retain: bool
    user_properties: tuple[tuple[str, str], ...]
    correlation_data: bytes | None
    seen_ns: int
    subscription_ids: tuple[int, ...] = ()  # MQTT 5: which subscriptions matched it


class _StampingClient(aiomqtt.Client):
    """aiomqtt's client with a receive stamp taken in paho's callback.

    Stamping when the application dequeues would add queueing delay to every hop's
    latency; paho calls ``_on_message`` as soon as the packet is parsed.
    """

    inbound: asyncio.Queue[InboundMessage]
    inbound_dropped: int

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        seen_ns = time.monotonic_ns()
        props = getattr(message, "properties", None)
        user_properties: tuple[tuple[str, str], ...] = ()
        correlation: bytes | None = None
        subscription_ids: tuple[int, ...] = ()
        if props is not None:
            user_properties = tuple(getattr(props, "UserProperty", ()))
            correlation = getattr(props, "CorrelationData", None)
            subscription_ids = tuple(getattr(props, "SubscriptionIdentifier", ()))
        inbound = InboundMessage(
            message.topic,
            bytes(message.payload),
            bool(message.retain),
            user_properties,
            correlation,
            seen_ns,
            subscription_ids,
        )
        try:
            self.inbound.put_nowait(inbound)
        except asyncio.QueueFull:
            self.inbound_dropped += 1

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # aiomqtt defers add_writer with the fd read now; if the socket closes first, the
        # deferred call registers a dead (or reused) fd. Read the fd when registering, and
        # register at once when already on the loop's thread.
        def write() -> None:
            try:
                client.loop_write()
            except Exception as exc:
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            fileno = sock.fileno()
            if fileno != -1:
                self._loop.add_writer(fileno, write)

        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            register()
        else:
            self._loop.call_soon_threadsafe(register)


class MqttSession:
    """One MQTT connection, used as an async context manager.

    Args:
        target: the broker.
        client_id: the MQTT client identifier (a VIN for per-vehicle sessions); a random
            one when None.
        inbound_limit: how many received messages may wait for the application; past it
            messages are dropped and counted in ``inbound_dropped``.
    """

    def __init__(
        self, target: BrokerTarget, client_id: str | None = None, *, inbound_limit: int = 100_000
    ) -> None:
        self.target = target
        self.client_id = client_id
        self._inbound_limit = inbound_limit
        self._client: _StampingClient | None = None

    async def __aenter__(self) -> MqttSession:
        t = self.target
        client = _StampingClient(
            t.host,
            t.port,
            identifier=self.client_id,
            username=t.username,
            password=t.password,
            protocol=aiomqtt.ProtocolVersion.V5
            if t.protocol == "5"
            else aiomqtt.ProtocolVersion.V311,
            keepalive=t.keepalive_s,
            tls_context=t.tls,
            timeout=t.connect_timeout_s,
            socket_options=[_NODELAY],
            logger=log,
        )
        client.inbound = asyncio.Queue(self._inbound_limit)
        client.inbound_dropped = 0
        try:
            async with asyncio.timeout(t.connect_timeout_s):
                await client.__aenter__()
        except TimeoutError:
            raise ConnectError(t.url, "no answer in time", reason="timeout") from None
        except aiomqtt.MqttCodeError as exc:
            code = _code_of(exc)
            if code in _NOT_AUTHORIZED_CODES:
                raise NotAuthorizedError(
                    t.url, f"broker refused the credentials ({exc})", reason="not_authorized"
                ) from None
            raise ConnectError(
                t.url, f"broker refused the connection ({exc})", reason="refused"
            ) from None
        except aiomqtt.MqttError as exc:
            raise ConnectError(t.url, str(exc), reason=_reason_of(str(exc))) from None
        self._client = client
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        # A broken connection cannot say goodbye; nothing is lost by not waiting for it.
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(2):
                await client.__aexit__(exc_type, exc, tb)

    async def wait_disconnected(self) -> None:
        """Return when the connection is lost (or closed)."""
        disconnected = self._connected()._disconnected
        await asyncio.wait([disconnected])
        if not disconnected.cancelled():
            disconnected.exception()  # retrieved: asyncio would log it as never retrieved

    @property
    def inbound_dropped(self) -> int:
        """Messages dropped because the application fell ``inbound_limit`` behind."""
        return self._connected().inbound_dropped

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        user_properties: Sequence[tuple[str, str]] = (),
        correlation_data: bytes | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        """Publish one message; with QoS 1 or 2, return when the broker acknowledged it.

        Raises:
            SendError: the client is not connected, its queue is full, or no ack came.
        """
        client = self._connected()
        properties = None
        if self.target.protocol == "5" and (user_properties or correlation_data):
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if user_properties:
                properties.UserProperty = list(user_properties)
            if correlation_data:
                properties.CorrelationData = correlation_data
        try:
            await client.publish(topic, payload, qos=qos, properties=properties, timeout=timeout_s)
        except aiomqtt.MqttCodeError as exc:
            raise SendError(f"publish to {topic} failed: {exc}", reason=_send_reason(exc)) from None
        except ValueError as exc:  # paho refuses a topic it finds invalid
            raise SendError(f"publish to {topic} refused: {exc}", reason="invalid") from None
        except aiomqtt.MqttError as exc:
            raise SendError(
                f"publish to {topic} failed: {exc}", reason=_reason_of(str(exc))
            ) from None

    async def subscribe(
        self, filters: Sequence[str], *, qos: int = 1, identify: bool = False
    ) -> list[int]:
        """Subscribe to every filter and return the broker's SUBACK code for each.

        Codes 0-2 are the granted QoS; 128 and up are refusals (aiomqtt returns them
        rather than raising). With ``identify`` (MQTT 5), filter ``i`` gets Subscription
        Identifier ``i + 1``, so each message says which filters matched it: a broker
        sends one copy per matching subscription, and without the identifiers the copies
        of overlapping filters cannot be told apart.
        """
        if identify and self.target.protocol == "5":
            return [
                (await self._subscribe([f], qos, subscription_id=i + 1))[0]
                for i, f in enumerate(filters)
            ]
        return await self._subscribe(filters, qos)

    async def _subscribe(
        self, filters: Sequence[str], qos: int, subscription_id: int | None = None
    ) -> list[int]:
        client = self._connected()
        properties = None
        if subscription_id is not None:
            properties = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
            properties.SubscriptionIdentifier = subscription_id
        try:
            granted = await client.subscribe([(f, qos) for f in filters], properties=properties)
        except aiomqtt.MqttError as exc:
            raise ConnectError(
                self.target.url, f"subscribe failed: {exc}", reason=_reason_of(str(exc))
            ) from None
        return [code if isinstance(code, int) else int(code.value) for code in granted]

    async def messages(self) -> AsyncIterator[InboundMessage]:
        """Received messages in arrival order, until the connection ends.

        Raises:
            ConnectError: the connection was lost.
        """
        client = self._connected()
        disconnected = client._disconnected
        while True:
            if not client.inbound.empty():
                yield client.inbound.get_nowait()
                continue
            getter = asyncio.ensure_future(client.inbound.get())
            try:
                await asyncio.wait((getter, disconnected), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                yield getter.result()
                continue
            raise ConnectError(self.target.url, "connection lost", reason="disconnected")

    def _connected(self) -> _StampingClient:
        if self._client is None:
            raise RuntimeError("MqttSession used outside 'async with'")
        return self._client


def _code_of(exc: aiomqtt.MqttCodeError) -> int:
    rc = exc.rc
    return rc if isinstance(rc, int) else int(getattr(rc, "value", -1))


def _send_reason(exc: aiomqtt.MqttCodeError) -> str:
    code = _code_of(exc)
    if code == paho.MQTT_ERR_NO_CONN:
        return "not_connected"
    if code == paho.MQTT_ERR_QUEUE_SIZE:
        return "queue_full"
    if code == paho.MQTT_ERR_PAYLOAD_SIZE:
        return "too_large"
    return "error"


def _reason_of(text: str) -> str:
    """A bounded reason label from an error text that lost its type inside aiomqtt."""
    lowered = text.lower()
    for needle, reason in (
        ("refused", "refused"),
        ("timed out", "timeout"),
        ("certificate", "tls"),
        ("ssl", "tls"),
        ("name or service", "dns"),
        ("nodename", "dns"),
        ("disconnected", "disconnected"),
        ("unreachable", "unreachable"),
    ):
        if needle in lowered:
            return reason
    return "error"
