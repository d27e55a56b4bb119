"""The MQTT session (fleetprobe's own client) against a real Mosquitto, in MQTT 5 and 3.1.1."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from fleetprobe.faults.proxy import ProxySet
from fleetprobe.faults.toxics import ToxicSpec
from fleetprobe.testbed.broker import EmbeddedBroker
from fleetprobe.testbed.mosquitto import MosquittoProcess, free_port
from fleetprobe.transport.errors import ConnectError, NotAuthorizedError, SendError
from fleetprobe.transport.mqtt import BrokerTarget, InboundMessage, MqttSession, ProtocolName
from fleetprobe.transport.servers import split_listen

PROTOCOLS: list[ProtocolName] = ["5", "3.1.1"]


def on(broker: BrokerTarget, protocol: ProtocolName, **changes: object) -> BrokerTarget:
    """The same broker, spoken to in ``protocol``."""
    return BrokerTarget(broker.host, broker.port, protocol=protocol, **changes)  # type: ignore[arg-type]


async def next_message(session: MqttSession, timeout_s: float = 5) -> InboundMessage:
    async with asyncio.timeout(timeout_s):
        async for message in session.messages():
            return message
    raise AssertionError("the connection ended")


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_a_publish_arrives_once_at_its_qos_with_its_properties(
    broker: BrokerTarget, prefix: str, protocol: ProtocolName, qos: int
) -> None:
    """QoS 0-2 each way; MQTT 5 carries user properties and correlation data, 3.1.1 not."""
    target = on(broker, protocol)
    async with MqttSession(target) as subscriber, MqttSession(target) as publisher:
        assert await subscriber.subscribe([f"{prefix}/#"], qos=2, identify=True) == [2]
        before = time.monotonic_ns()
        await publisher.publish(
            f"{prefix}/a",
            b'{"n": 1}',
            qos=qos,
            user_properties=[("traceparent", "00-ab-cd-01")],
            correlation_data=b"\x01\x02",
        )
        message = await next_message(subscriber)
        await publisher.publish(f"{prefix}/end", b"", qos=qos)
        end = await next_message(subscriber)
    assert (message.topic, message.payload, end.topic) == (
        f"{prefix}/a",
        b'{"n": 1}',
        f"{prefix}/end",
    )
    assert before < message.seen_ns <= time.monotonic_ns()
    if protocol == "5":
        assert message.user_properties == (("traceparent", "00-ab-cd-01"),)
        assert message.correlation_data == b"\x01\x02"
        assert message.subscription_ids == (1,)
    else:
        assert (message.user_properties, message.correlation_data) == ((), None)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_many_unacknowledged_publishes_all_complete(
    broker: BrokerTarget, prefix: str, protocol: ProtocolName
) -> None:
    """500 QoS 1 and 2 publishes at once: more than the broker's Receive Maximum (20)."""
    target = on(broker, protocol)
    async with MqttSession(target) as subscriber, MqttSession(target) as publisher:
        await subscriber.subscribe([f"{prefix}/#"], qos=1)
        async with asyncio.timeout(20):
            await asyncio.gather(
                *(publisher.publish(f"{prefix}/{i}", b"x", qos=1 + i % 2) for i in range(500))
            )
            topics = set()
            async for message in subscriber.messages():
                topics.add(message.topic)
                if len(topics) == 500:
                    break
    assert topics == {f"{prefix}/{i}" for i in range(500)}


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_an_idle_session_stays_connected_past_its_keepalive(
    broker: BrokerTarget, prefix: str, protocol: ProtocolName
) -> None:
    """With a 1 s keepalive the broker drops a client silent for 1.5 s; pings prevent it."""
    async with MqttSession(on(broker, protocol, keepalive_s=1)) as session:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(session.wait_disconnected(), 3.0)
        await session.subscribe([f"{prefix}/x"], qos=1)
        await session.publish(f"{prefix}/x", b"still here", qos=1)
        assert (await next_message(session)).payload == b"still here"


@pytest.fixture
async def black_hole_path(broker: BrokerTarget) -> AsyncIterator[tuple[BrokerTarget, ProxySet]]:
    """A proxy in front of the broker, where a test can black-hole the broker's answers."""
    proxies = ProxySet(seed=1)
    proxy = await proxies.create("broker", "127.0.0.1:0", f"{broker.host}:{broker.port}")
    host, port = split_listen(proxy.listen)
    yield BrokerTarget(host, port, keepalive_s=1), proxies
    await proxies.close()


async def test_a_silent_broker_ends_the_session_after_one_and_a_half_keepalives(
    black_hole_path: tuple[BrokerTarget, ProxySet],
) -> None:
    """No PINGRESP (answers black-holed): the session closes itself and says why."""
    target, proxies = black_hole_path
    async with MqttSession(target) as session:
        proxies.get("broker").add_toxic(
            ToxicSpec(type="timeout", stream="downstream", attributes={"timeout": 0})
        )
        silenced = time.monotonic()
        await asyncio.wait_for(session.wait_disconnected(), 8.0)
        # 1.5 keepalives of 1 s; never before one keepalive, and late only by what a busy
        # machine adds to the timer.
        assert 1.0 <= time.monotonic() - silenced <= 5.0
        with pytest.raises(ConnectError, match="no answer from the broker within its keepalive"):
            await next_message(session)


async def publish_every_50ms(session: MqttSession, topic: str) -> None:
    while True:
        await session.publish(topic, b"x")
        await asyncio.sleep(0.05)


async def test_a_session_that_only_publishes_stays_connected(
    broker: BrokerTarget, prefix: str
) -> None:
    """QoS 0 publishes never get an answer: the session pings anyway, and lives on."""
    async with MqttSession(on(broker, "5", keepalive_s=1)) as session:
        publishing = asyncio.create_task(publish_every_50ms(session, f"{prefix}/p"))
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(session.wait_disconnected(), 3.0)
        finally:
            publishing.cancel()


async def test_a_publishing_session_notices_a_silent_broker(
    black_hole_path: tuple[BrokerTarget, ProxySet], prefix: str
) -> None:
    """Writing all the time is no sign of life from the broker: unanswered pings end it."""
    target, proxies = black_hole_path
    async with MqttSession(target) as session:
        publishing = asyncio.create_task(publish_every_50ms(session, f"{prefix}/p"))
        try:
            proxies.get("broker").add_toxic(
                ToxicSpec(type="timeout", stream="downstream", attributes={"timeout": 0})
            )
            await asyncio.wait_for(session.wait_disconnected(), 5.0)
        finally:
            publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError, SendError):
                await publishing


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_second_session_with_the_same_client_id_takes_over(
    broker: BrokerTarget, protocol: ProtocolName
) -> None:
    """The broker closes the first session; its messages end with ConnectError."""
    target = on(broker, protocol)
    async with MqttSession(target, "same-id") as first, MqttSession(target, "same-id"):
        await asyncio.wait_for(first.wait_disconnected(), 5.0)
        with pytest.raises(ConnectError):
            await next_message(first)


async def test_a_takeover_announced_by_the_broker_is_named() -> None:
    """A broker that says why (MQTT 5 DISCONNECT 0x8E, as the embedded one does) is quoted."""
    async with EmbeddedBroker(host="127.0.0.1", port=0) as embedded:
        target = BrokerTarget("127.0.0.1", embedded.port)
        async with MqttSession(target, "same-id") as first, MqttSession(target, "same-id"):
            await asyncio.wait_for(first.wait_disconnected(), 5.0)
            with pytest.raises(ConnectError, match="session taken over by another client"):
                await next_message(first)


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("a/+/b", "invalid"),
        ("a/#", "invalid"),
        ("a/\x00", "invalid"),
        ("", "invalid"),
        ("a/\udc80", "invalid"),
        ("t" * 65_536, "invalid"),
    ],
    ids=["plus", "hash", "nul", "empty", "surrogate", "too-long"],
)
async def test_a_topic_that_cannot_be_published_is_refused_before_sending(
    broker: BrokerTarget, topic: str, reason: str
) -> None:
    """Each is a SendError with a reason; the session stays usable."""
    async with MqttSession(broker) as session:
        with pytest.raises(SendError) as refused:
            await session.publish(topic, b"x", qos=1)
        assert refused.value.reason == reason
        await session.publish("fine/topic", b"x", qos=1)


@pytest.fixture(scope="module")
def locked_broker() -> Iterator[BrokerTarget]:
    """A Mosquitto that lets only ``car``/``secret`` in."""
    with MosquittoProcess(users={"car": "secret"}) as process:
        yield BrokerTarget(process.host, process.port)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_wrong_credentials_are_not_authorized(
    locked_broker: BrokerTarget, protocol: ProtocolName
) -> None:
    """A refused CONNACK (v5 134/135, v3 4/5) is NotAuthorizedError; the right ones pass."""
    with pytest.raises(NotAuthorizedError) as refused:
        async with MqttSession(on(locked_broker, protocol, username="car", password="wrong")):
            pass
    assert refused.value.reason == "not_authorized"
    assert "wrong" not in str(refused.value)
    async with MqttSession(on(locked_broker, protocol, username="car", password="secret")):
        pass


async def test_nothing_listening_is_refused(prefix: str) -> None:
    """A closed port fails at once with reason ``refused``."""

    with pytest.raises(ConnectError) as refused:
        async with MqttSession(BrokerTarget("127.0.0.1", free_port())):
            pass
    assert refused.value.reason == "refused"


async def test_nothing_is_published_on_a_connection_before_its_connack(
    broker: BrokerTarget, prefix: str
) -> None:
    """While a persistent session reconnects, a publish is refused (not connected) rather
    than written ahead of the CONNACK, where a resume would send it a second time."""
    kept = dataclasses.replace(broker, session_expiry_s=60)
    async with MqttSession(kept) as session:
        await session.disconnect(end_session=False)
        reconnecting = asyncio.create_task(session.reconnect())
        await asyncio.sleep(0)  # one turn: it now waits for its socket and CONNACK
        with pytest.raises(SendError, match="not connected"):
            await session.publish(f"{prefix}/early", b"x", qos=1)
        await asyncio.wait_for(reconnecting, 5)
        assert session.session_present
        await session.publish(f"{prefix}/after", b"x", qos=1)
        assert session.resent == 0
