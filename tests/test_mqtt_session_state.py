"""The session state of the MQTT client as pure logic: one packet-id space, ids held while
the broker may hold them, acknowledgements checked against their flow, and what a resumed
session sends again. The embedded broker's topic index against the plain matcher."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetprobe.testbed.topic_index import TopicIndex
from fleetprobe.transport.errors import SendError
from fleetprobe.transport.mqtt_codec import MQTT_5, Ack, Connack, PacketType, decode_server_packet
from fleetprobe.transport.mqtt_session_state import Outbound, SessionState
from fleetprobe.transport.topics import match_levels


def pending(state: SessionState, qos: int, topic: str = "t") -> tuple[int, Outbound]:
    packet_id = state.take_packet_id()
    frame = bytes((0x30 | qos << 1,)) + b"\x05\x00\x01t" + packet_id.to_bytes(2)
    expect = PacketType.PUBACK if qos == 1 else PacketType.PUBREC
    entry = Outbound(topic, qos, frame, expect, asyncio.get_running_loop().create_future())
    state.outbound[packet_id] = entry
    return packet_id, entry


async def test_publishes_and_subscribes_share_one_packet_id_space() -> None:
    state = SessionState(persistent=False, window=20)
    publish_id, _ = pending(state, 1)
    state.subacks[state.take_packet_id()] = asyncio.get_running_loop().create_future()
    taken = {publish_id, *state.subacks}
    assert len(taken) == 2
    assert state.take_packet_id() not in taken


async def test_an_abandoned_qos_2_id_stays_held_until_the_broker_completes_it() -> None:
    """The sender timed out (its future cancelled); the broker may still hold the id, so
    it is not given to a new publish until PUBCOMP frees it."""
    state = SessionState(persistent=False, window=20)
    written: list[bytes] = []
    packet_id, entry = pending(state, 2)
    entry.done.cancel()  # the sender's timeout
    for _ in range(70_000):
        assert state.take_packet_id() != packet_id  # round and round, past it
    state.on_ack(Ack(PacketType.PUBREC, packet_id), written.append, MQTT_5)
    assert written and written[0][0] >> 4 == PacketType.PUBREL
    state.on_ack(Ack(PacketType.PUBCOMP, packet_id), written.append, MQTT_5)
    assert packet_id not in state.outbound


async def test_a_puback_for_a_qos_2_publish_fails_it_as_a_protocol_error() -> None:
    state = SessionState(persistent=False, window=20)
    packet_id, entry = pending(state, 2, "v/1/telemetry")
    state.on_ack(Ack(PacketType.PUBACK, packet_id), lambda _: None, MQTT_5)
    with pytest.raises(SendError, match="PUBACK where the protocol requires PUBREC") as err:
        await entry.done
    assert err.value.reason == "protocol_error"
    assert packet_id not in state.outbound


async def test_a_refusal_names_the_broker_reason() -> None:
    state = SessionState(persistent=False, window=20)
    packet_id, entry = pending(state, 1)
    state.on_ack(Ack(PacketType.PUBACK, packet_id, 0x87), lambda _: None, MQTT_5)
    with pytest.raises(SendError, match="not authorized") as err:
        await entry.done
    assert err.value.reason == "rejected"


async def test_a_lost_connection_keeps_a_persistent_sessions_flows_and_resends_them() -> None:
    """Clean: every flow fails and its id is free. Persistent: they wait, and resuming
    sends the unfinished PUBLISH again with DUP and the PUBREL again, in their order."""
    lost = SendError("gone", reason="disconnected")
    clean = SessionState(persistent=False, window=20)
    _, entry = pending(clean, 1)
    suback = clean.subacks[clean.take_packet_id()] = asyncio.get_running_loop().create_future()
    clean.connection_lost(lost)
    assert not clean.outbound and entry.done.exception() is lost
    assert suback.exception() is lost

    kept = SessionState(persistent=True, window=20)
    first_id, first = pending(kept, 1)
    second_id, second = pending(kept, 2)
    kept.on_ack(Ack(PacketType.PUBREC, second_id), lambda _: None, MQTT_5)
    kept.connection_lost(lost)
    assert not first.done.done() and not second.done.done()
    written: list[bytes] = []
    assert kept.resume(written.append, MQTT_5) == 2
    assert written[0][0] == first.frame[0] | 0x08 and written[0][1:] == first.frame[1:]
    assert written[1][0] >> 4 == PacketType.PUBREL
    kept.on_ack(Ack(PacketType.PUBACK, first_id), written.append, MQTT_5)
    assert first.done.done() and first.done.exception() is None


LEVEL = st.sampled_from(["a", "b", "c", "$sys"])


@given(
    filters=st.lists(
        st.lists(st.one_of(LEVEL, st.just("+")), min_size=1, max_size=4).flatmap(
            lambda levels: st.sampled_from([levels, [*levels, "#"]])
        ),
        max_size=8,
    ),
    topic=st.lists(LEVEL, min_size=1, max_size=5),
)
def test_the_topic_index_finds_every_holder_of_a_matching_filter(
    filters: list[list[str]], topic: list[str]
) -> None:
    """Every filter that matches the topic is among the candidates (a superset is fine:
    the broker's exact match decides); removing all filters leaves an empty tree."""
    index: TopicIndex[int] = TopicIndex()
    for holder, levels in enumerate(filters):
        index.add("/".join(levels), holder)
    candidates = index.candidates(topic)
    for holder, levels in enumerate(filters):
        if match_levels(levels, topic):
            assert holder in candidates
    for holder, levels in enumerate(filters):
        index.remove("/".join(levels), holder)
    assert index.candidates(topic) == set()
    assert not index._root.children


@pytest.mark.parametrize(
    ("body", "answered_311", "code"),
    [(b"\x00\x01", True, 1), (b"\x00\x87", False, 0x87), (b"\x00\x00\x00", False, 0)],
    ids=["311-refusal", "5-without-properties", "5-accepted"],
)
def test_a_3_1_1_connack_to_an_mqtt_5_connect_is_told_apart(
    body: bytes, answered_311: bool, code: int
) -> None:
    """Two bytes with code 1 are a 3.1.1 broker's "unacceptable protocol version"; two
    bytes with another code, an MQTT 5 broker that left its properties out."""
    connack = decode_server_packet(0x20, body, MQTT_5)
    assert isinstance(connack, Connack)
    assert (connack.answered_311, connack.reason_code) == (answered_311, code)


async def test_an_abandoned_publish_keeps_its_window_slot_until_completed() -> None:
    """The broker still counts a publish whose sender timed out against its Receive
    Maximum: the window stays full until the broker completes it."""
    state = SessionState(persistent=False, window=1)
    await state.window.acquire()  # the sender's slot
    packet_id, _ = pending(state, 1)
    state.abandoned(packet_id)  # its sender timed out...
    state.window.release()  # ...and gave its own slot back
    assert state.window.used == 1
    waiting = asyncio.ensure_future(state.window.acquire())
    await asyncio.sleep(0)  # let it start waiting
    assert not waiting.done()
    state.on_ack(Ack(PacketType.PUBACK, packet_id), lambda _: None, MQTT_5)
    await asyncio.wait_for(waiting, 1)
    assert state.window.used == 1


async def test_a_pubcomp_for_a_flow_the_broker_completed_already_completes_it() -> None:
    """PUBREL sent again on resuming; the broker had completed the flow and answers PUBCOMP
    0x92 (packet identifier not found): the message was accepted at PUBREC."""
    state = SessionState(persistent=True, window=20)
    packet_id, entry = pending(state, 2)
    state.on_ack(Ack(PacketType.PUBREC, packet_id), lambda _: None, MQTT_5)
    state.on_ack(Ack(PacketType.PUBCOMP, packet_id, 0x92), lambda _: None, MQTT_5)
    await entry.done
    assert not state.outbound


def test_a_session_the_broker_lost_forgets_the_qos_2_ids_it_received() -> None:
    """Else a new message reusing such an id would be acknowledged and never delivered."""
    state = SessionState(persistent=True, window=20)
    state.qos2_received.add(7)
    state.discard(SendError("lost", reason="session_lost"))
    assert state.qos2_received == set()
