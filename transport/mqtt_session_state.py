"""What one MQTT session keeps across its connections.

A session's packet identifiers, the QoS 1/2 publishes the broker has not completed, and
the QoS 2 messages it has delivered to us live here rather than on a connection: with a
persistent session (clean start off, a Session Expiry) they outlast a dropped connection,
and on a reconnect that finds the session present, every unfinished PUBLISH is sent again
with DUP set and every unfinished PUBREL again, as MQTT requires (MQTT 5 4.4, 3.1.1 4.4).

Every acknowledgement is checked against the flow it answers: a PUBACK where a QoS 2
publish needs a PUBREC is a protocol error that fails that publish with its reason, never
a wait for a PUBCOMP that will not come.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fleetprobe.transport.errors import SendError
from fleetprobe.transport.mqtt_broker_info import describe
from fleetprobe.transport.mqtt_codec import Ack, PacketType, Suback, encode_ack

PROTOCOL_ERROR = "protocol_error"
"""The send error of a publish the broker answered out of protocol."""
SESSION_LOST = "session_lost"
"""The send error of a publish in flight when the broker came back without the session."""

_PUBLISH_REASONS = {
    0x10: "no matching subscribers",
    0x80: "unspecified error",
    0x83: "implementation specific error",
    0x87: "not authorized",
    0x90: "topic name invalid",
    0x91: "packet identifier in use",
    0x92: "packet identifier not found",
    0x97: "quota exceeded",
    0x99: "payload format invalid",
}


class InFlightWindow:
    """How many QoS 1/2 publishes may be unacknowledged at once (the broker's Receive
    Maximum, or ``inflight``). A sender holds a slot while it waits for its
    acknowledgement; a publish whose sender stopped waiting keeps holding one until the
    broker completes it, since the broker still counts it against the window."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        """Wait for a free slot and take it."""
        while self.used >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.used += 1

    def hold(self) -> None:
        """Take a slot without waiting: one its holder is handing over at the same moment."""
        self.used += 1

    def release(self) -> None:
        """Give a slot back."""
        self.used -= 1
        self._wake()

    def resize(self, limit: int) -> None:
        """A new limit (a new CONNACK's Receive Maximum); slots held stay held."""
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        free = self.limit - self.used
        for waiter in list(self._waiters):
            if free <= 0:
                break
            if not waiter.done():
                waiter.set_result(None)
                free -= 1


@dataclass(slots=True)
class Outbound:
    """A QoS 1/2 PUBLISH the broker has not completed.

    ``done`` is set when the flow completes, fails with the broker's refusal, or is
    cancelled when its sender stopped waiting; the entry (and its packet id) stays until
    the broker completes the flow or the session ends, since the broker may still hold it.
    """

    topic: str
    qos: int
    frame: bytes  # the PUBLISH as first sent
    expect: PacketType  # PUBACK (QoS 1), PUBREC then PUBCOMP (QoS 2)
    done: asyncio.Future[None]
    holds_slot: bool = False  # its sender stopped waiting: it holds its window slot itself


class SessionState:
    """Packet ids, unfinished publishes and received QoS 2 ids of one session.

    One packet-id space serves publishes and subscribes alike (MQTT forbids reusing an id
    while either flow holds it).
    """

    def __init__(self, *, persistent: bool, window: int) -> None:
        self.persistent = persistent
        self.window = InFlightWindow(window)
        self.outbound: dict[int, Outbound] = {}
        self.subacks: dict[int, asyncio.Future[Suback]] = {}
        self.qos2_received: set[int] = set()
        self._next_id = 0

    def take_packet_id(self) -> int:
        """The next identifier, 1..65535 in turn, that no flow of this session holds.

        Raises:
            SendError: all 65,535 are held (a broker that completes nothing).
        """
        outbound, subacks = self.outbound, self.subacks
        for _ in range(65_535):
            self._next_id = self._next_id % 65_535 + 1
            if self._next_id not in outbound and self._next_id not in subacks:
                return self._next_id
        raise SendError("no free packet identifier", reason="queue_full")

    def on_ack(self, ack: Ack, write: Callable[[bytes], None], level: int) -> None:
        """Advance the publish ``ack`` answers; ``write`` sends a PUBREL when one is due."""
        packet_id = ack.packet_id
        pending = self.outbound.get(packet_id)
        if pending is None:
            return  # nothing of ours waits for it (a late duplicate)
        if ack.packet_type is not pending.expect:
            hint = ""
            if pending.qos == 2 and ack.packet_type is PacketType.PUBACK:
                hint = ": the broker does not implement QoS 2 (use qos: 1)"
            self._finish(
                packet_id,
                SendError(
                    f"publish to {pending.topic}: the broker answered a QoS {pending.qos} "
                    f"PUBLISH with {ack.packet_type.name} where the protocol requires "
                    f"{pending.expect.name}{hint}",
                    reason=PROTOCOL_ERROR,
                ),
            )
            return
        if ack.reason_code >= 0x80 and ack.packet_type is not PacketType.PUBCOMP:
            # (A PUBCOMP's 0x92 after a PUBREL sent again means the broker had completed
            # the flow already: the message was accepted at PUBREC.)
            detail = describe(ack.reason_code, ack.properties, _PUBLISH_REASONS)
            self._finish(
                packet_id,
                SendError(
                    f"publish to {pending.topic} refused by the broker ({detail})",
                    reason="rejected",
                ),
            )
            return
        if pending.expect is PacketType.PUBREC:
            pending.expect = PacketType.PUBCOMP
            write(encode_ack(PacketType.PUBREL, packet_id, level))
            return
        self._finish(packet_id, None)

    def abandoned(self, packet_id: int) -> None:
        """The sender of ``packet_id`` stopped waiting (timed out): if the broker has not
        completed the flow, the entry takes over the sender's window slot."""
        pending = self.outbound.get(packet_id)
        if pending is not None and not pending.holds_slot:
            pending.holds_slot = True
            self.window.hold()  # the sender gives its own slot back as it leaves

    def _finish(self, packet_id: int, error: SendError | None) -> None:
        pending = self.outbound.pop(packet_id)
        if pending.holds_slot:
            self.window.release()
        done = pending.done
        if not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    def connection_lost(self, error: SendError) -> None:
        """The connection ended: subscribes fail; without a persistent session every
        unfinished publish fails too and its id is free again (the broker forgot it)."""
        subacks, self.subacks = self.subacks, {}
        for future in subacks.values():
            if not future.done():
                future.set_exception(error)
        if not self.persistent:
            self.discard(error)

    def discard(self, error: SendError) -> None:
        """Forget every unfinished flow (the session ended, or the broker lost it)."""
        for packet_id in list(self.outbound):
            self._finish(packet_id, error)
        self.qos2_received.clear()

    def resume(self, write: Callable[[bytes], None], level: int) -> int:
        """Send every unfinished flow again on a new connection that found the session
        present, in their first order; return how many."""
        for packet_id, pending in self.outbound.items():
            if pending.expect is PacketType.PUBCOMP:
                write(encode_ack(PacketType.PUBREL, packet_id, level))
            else:
                write(bytes((pending.frame[0] | 0x08,)) + pending.frame[1:])  # DUP
        return len(self.outbound)
