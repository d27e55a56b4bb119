"""MQTT-aware toxics between real MQTT clients and a real Mosquitto, through the proxy."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from fleetprobe.faults.proxy import Proxy, ProxySet
from fleetprobe.faults.toxics import ToxicSpec
from fleetprobe.transport.errors import ConnectError
from fleetprobe.transport.mqtt import BrokerTarget, InboundMessage, MqttSession
from fleetprobe.transport.servers import split_listen

END = "end"


@asynccontextmanager
async def proxied(
    broker: BrokerTarget, *front_toxics: ToxicSpec
) -> AsyncIterator[tuple[Proxy, BrokerTarget]]:
    """A proxy in front of the broker, and where clients connect to pass it.

    With ``front_toxics``, clients pass a second proxy first that carries them, so the
    first proxy reads what they let through.
    """
    proxies = ProxySet(seed=11)
    try:
        proxy = entry = await proxies.create(
            "broker", "127.0.0.1:0", f"{broker.host}:{broker.port}"
        )
        if front_toxics:
            entry = await proxies.create("front", "127.0.0.1:0", proxy.listen)
            for spec in front_toxics:
                entry.add_toxic(spec)
        host, port = split_listen(entry.listen)
        yield proxy, BrokerTarget(host, port, protocol=broker.protocol)
    finally:
        await proxies.close()


def toxic(kind: str, stream: str = "upstream", **attributes: Any) -> ToxicSpec:
    return ToxicSpec(type=kind, stream=stream, attributes=attributes)


async def collect_until_end(subscriber: MqttSession, prefix: str) -> list[InboundMessage]:
    """Messages up to the end marker (which passes no toxic and comes last)."""
    received = []
    async with asyncio.timeout(20):
        async for message in subscriber.messages():
            if message.topic == f"{prefix}/{END}":
                return received
            received.append(message)
    raise AssertionError("the connection ended")


async def publish_all(
    session: MqttSession, prefix: str, topics: dict[str, int], qos: int = 0
) -> None:
    for topic, count in topics.items():
        for n in range(count):
            await session.publish(f"{prefix}/{topic}", json.dumps({"n": n}).encode(), qos=qos)
    await session.publish(f"{prefix}/{END}", b"{}", qos=qos)


@pytest.fixture(params=["5", "3.1.1"])
def target(request: pytest.FixtureRequest, broker: BrokerTarget) -> BrokerTarget:
    return BrokerTarget(broker.host, broker.port, protocol=request.param)


async def test_drop_takes_the_share_asked_of_one_topic_only(
    target: BrokerTarget, prefix: str
) -> None:
    count, ratio = 2000, 0.1
    async with proxied(target) as (proxy, entry):
        proxy.add_toxic(toxic("mqtt_drop", topic=f"{prefix}/a/#", probability=ratio))
        async with MqttSession(target) as subscriber, MqttSession(entry) as fleet:
            await subscriber.subscribe([f"{prefix}/#"])
            await publish_all(fleet, prefix, {"a/x": count, "b/x": count})
            received = Counter(m.topic for m in await collect_until_end(subscriber, prefix))
    dropped = count - received[f"{prefix}/a/x"]
    sigma = math.sqrt(count * ratio * (1 - ratio))
    assert abs(dropped - count * ratio) <= 4 * sigma
    assert received[f"{prefix}/b/x"] == count


async def test_packets_split_into_single_bytes_are_still_recognised(
    target: BrokerTarget, prefix: str
) -> None:
    """A slicer in front cuts the stream into 1-byte writes; the drop still hits only `a`."""
    # 500 µs apart, most bytes reach the inner proxy in reads of their own.
    slicer = toxic("slicer", average_size=1, size_variation=0, delay=500)
    async with proxied(target, slicer) as (proxy, entry):
        proxy.add_toxic(toxic("mqtt_drop", topic=f"{prefix}/a"))
        async with MqttSession(target) as subscriber, MqttSession(entry) as fleet:
            await subscriber.subscribe([f"{prefix}/#"])
            await publish_all(fleet, prefix, {"a": 30, "b": 30})
            received = await collect_until_end(subscriber, prefix)
    assert [m.topic for m in received] == [f"{prefix}/b"] * 30
    assert [json.loads(m.payload)["n"] for m in received] == list(range(30))


async def test_duplicate_sends_each_matching_publish_twice(
    target: BrokerTarget, prefix: str
) -> None:
    async with proxied(target) as (proxy, entry):
        proxy.add_toxic(toxic("mqtt_duplicate", topic=f"{prefix}/a"))
        async with MqttSession(target) as subscriber, MqttSession(entry) as fleet:
            await subscriber.subscribe([f"{prefix}/#"])
            await publish_all(fleet, prefix, {"a": 5, "b": 5})
            received = Counter(m.topic for m in await collect_until_end(subscriber, prefix))
    assert received == {f"{prefix}/a": 10, f"{prefix}/b": 5}


async def test_corrupt_garbles_the_payload_but_delivers_it(
    target: BrokerTarget, prefix: str
) -> None:
    async with proxied(target) as (proxy, entry):
        proxy.add_toxic(toxic("mqtt_corrupt", topic=f"{prefix}/a"))
        async with MqttSession(target) as subscriber, MqttSession(entry) as fleet:
            await subscriber.subscribe([f"{prefix}/#"])
            await publish_all(fleet, prefix, {"a": 5, "b": 5})
            received = await collect_until_end(subscriber, prefix)
    garbled = [m.payload for m in received if m.topic == f"{prefix}/a"]
    assert len(garbled) == 5
    for payload in garbled:
        with pytest.raises(ValueError):
            json.loads(payload)
    assert [json.loads(m.payload) for m in received if m.topic == f"{prefix}/b"] == [
        {"n": n} for n in range(5)
    ]


async def test_delay_holds_matching_publishes_while_others_pass(
    broker: BrokerTarget, prefix: str
) -> None:
    async with proxied(broker) as (proxy, entry):
        proxy.add_toxic(toxic("mqtt_delay", topic=f"{prefix}/slow", delay=200))
        async with MqttSession(broker) as subscriber, MqttSession(entry) as fleet:
            await subscriber.subscribe([f"{prefix}/#"])
            start = time.monotonic()
            await fleet.publish(f"{prefix}/slow", b"1")
            await fleet.publish(f"{prefix}/fast", b"2")
            arrivals = []
            async with asyncio.timeout(5):
                async for message in subscriber.messages():
                    arrivals.append((message.topic, time.monotonic() - start))
                    if len(arrivals) == 2:
                        break
    # The fast one overtook the held one, which was held at least its 200 ms (no upper bound:
    # a busy machine adds its own delay to both).
    assert [topic for topic, _ in arrivals] == [f"{prefix}/fast", f"{prefix}/slow"]
    assert arrivals[1][1] >= 0.2


async def test_held_acks_keep_a_qos1_publish_waiting_until_removed(
    broker: BrokerTarget, prefix: str
) -> None:
    async with proxied(broker) as (proxy, entry):
        proxy.add_toxic(toxic("mqtt_hold_acks", stream="downstream"))
        async with MqttSession(broker) as subscriber, MqttSession(entry) as fleet:
            await subscriber.subscribe([f"{prefix}/#"])
            publish = asyncio.create_task(fleet.publish(f"{prefix}/a", b"1", qos=1))
            async with asyncio.timeout(5):
                async for _ in subscriber.messages():
                    break  # the broker has it, and has sent its PUBACK
            done, _ = await asyncio.wait([publish], timeout=0.3)
            assert not done
            proxy.remove_toxic("mqtt_hold_acks_downstream")
            await asyncio.wait_for(publish, 5)


async def test_disconnect_cuts_the_sessions_it_names(broker: BrokerTarget, prefix: str) -> None:
    async with (
        proxied(broker) as (proxy, entry),
        MqttSession(entry, "veh-1") as vehicle,
        MqttSession(entry, "other") as other,
    ):
        await vehicle.subscribe([f"{prefix}/#"])
        proxy.add_toxic(toxic("mqtt_disconnect", client_id="veh-"))
        with pytest.raises(ConnectError):
            async with asyncio.timeout(5):
                async for _ in vehicle.messages():
                    pass
        await other.publish(f"{prefix}/still", b"up", qos=1)
