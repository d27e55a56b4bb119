"""MQTT-aware toxics: act on whole MQTT packets, which Toxiproxy cannot do.

They see the packets the link's framer found (:mod:`faults.mqtt_frames`). On a stream
that is not MQTT, or past a malformed packet, the data is raw and passes untouched.
``topic`` is an MQTT topic filter (``+`` and ``#`` allowed); ``probability`` is the
chance, per matching packet, that the toxic acts on it.
"""

from __future__ import annotations

import asyncio

from pydantic import Field, field_validator

from fleetprobe.faults.link import Forward, Link, Segment
from fleetprobe.faults.mqtt_frames import (
    MalformedError,
    Packet,
    PublishView,
    inspect_publish,
    with_dup_flag,
)
from fleetprobe.faults.toxics import Attributes, Toxic, ToxicSpec
from fleetprobe.transport.mqtt_codec import PacketType
from fleetprobe.transport.topics import check_topic_filter, topic_matches

_ACKS = frozenset((PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBCOMP))


class PublishAttributes(Attributes):
    topic: str = "#"
    probability: float = Field(default=1.0, ge=0.0, le=1.0)

    @field_validator("topic")
    @classmethod
    def _valid_filter(cls, topic: str) -> str:
        check_topic_filter(topic)
        return topic


class DelayedPublishAttributes(PublishAttributes):
    delay: int = Field(default=0, ge=0, description="ms")


class _PublishToxic(Toxic, attributes=PublishAttributes):
    """Base of the toxics that pick PUBLISH packets by topic and chance."""

    attributes: PublishAttributes

    async def push(self, segment: Segment, forward: Forward) -> None:
        packets: list[Packet] = []
        for packet in segment.packets:
            view = self._matching(packet)
            if view is None:
                packets.append(packet)
            else:
                packets.extend(self.act(packet, view, segment))
        if packets:
            segment.packets = packets
            await forward(segment)

    def _matching(self, packet: Packet) -> PublishView | None:
        if packet.kind != PacketType.PUBLISH:
            return None
        try:
            view = inspect_publish(packet, self.link.session, self.link.direction)
        except MalformedError:
            return None
        if not topic_matches(self.attributes.topic, view.topic):
            return None
        if self.link.rng.random() >= self.attributes.probability:
            return None
        return view

    def act(self, packet: Packet, view: PublishView, segment: Segment) -> list[Packet]:
        """The packets that go on in place of a chosen PUBLISH."""
        raise NotImplementedError


class PublishDrop(_PublishToxic, kind="mqtt_drop", attributes=PublishAttributes):
    """Drop matching PUBLISH packets (a QoS 1/2 sender will retry; QoS 0 is lost)."""

    def act(self, packet: Packet, view: PublishView, segment: Segment) -> list[Packet]:
        return []


class PublishDuplicate(_PublishToxic, kind="mqtt_duplicate", attributes=PublishAttributes):
    """Send matching PUBLISH packets twice; the copy carries the DUP flag when QoS > 0."""

    def act(self, packet: Packet, view: PublishView, segment: Segment) -> list[Packet]:
        return [packet, with_dup_flag(packet)]


class PublishCorrupt(_PublishToxic, kind="mqtt_corrupt", attributes=PublishAttributes):
    """Garble the payload of matching PUBLISH packets; the packet itself stays valid."""

    def act(self, packet: Packet, view: PublishView, segment: Segment) -> list[Packet]:
        data = bytearray(packet.data)
        if view.payload_offset >= len(data):
            return [packet]
        # Inverting the first byte makes any JSON or UTF-8 text unreadable; one more
        # random byte makes it unlike a systematic encoding mistake.
        data[view.payload_offset] ^= 0xFF
        position = self.link.rng.randrange(view.payload_offset, len(data))
        data[position] ^= 0x5A
        return [Packet(bytes(data), packet.kind)]


class PublishDelay(_PublishToxic, kind="mqtt_delay", attributes=DelayedPublishAttributes):
    """Hold matching PUBLISH packets back ``delay`` ms while the others pass them."""

    attributes: DelayedPublishAttributes

    def act(self, packet: Packet, view: PublishView, segment: Segment) -> list[Packet]:
        held = Segment([packet], segment.read_at, resume_after=self)
        loop = asyncio.get_running_loop()
        loop.call_later(self.attributes.delay / 1000, self.link.inject, held)
        return []


class HoldAcksAttributes(Attributes):
    delay: int = Field(default=0, ge=0, description="ms; 0 = until the toxic is removed")


class HoldAcks(Toxic, kind="mqtt_hold_acks", attributes=HoldAcksAttributes):
    """Hold back PUBACK, PUBREC and PUBCOMP packets ``delay`` ms, or while the toxic lasts."""

    attributes: HoldAcksAttributes

    def __init__(self, spec: ToxicSpec, link: Link) -> None:
        super().__init__(spec, link)
        self._held: list[Segment] = []

    async def push(self, segment: Segment, forward: Forward) -> None:
        acks = [packet for packet in segment.packets if packet.kind in _ACKS]
        if not acks:
            await forward(segment)
            return
        held = Segment(acks, segment.read_at, resume_after=self)
        if self.attributes.delay:
            loop = asyncio.get_running_loop()
            loop.call_later(self.attributes.delay / 1000, self.link.inject, held)
        else:
            self._held.append(held)
        rest = [packet for packet in segment.packets if packet.kind not in _ACKS]
        if rest:
            segment.packets = rest
            await forward(segment)

    def detach(self) -> None:
        super().detach()
        for held in self._held:
            self.link.inject(held)
        self._held.clear()


class DisconnectAttributes(Attributes):
    client_id: str = Field(default="", description="cut sessions whose client id starts so")


class Disconnect(Toxic, kind="mqtt_disconnect", attributes=DisconnectAttributes):
    """Cut MQTT sessions (by client id prefix) at once, and again each time they return."""

    attributes: DisconnectAttributes

    def attach(self) -> None:
        self._cut_if_matching()

    async def push(self, segment: Segment, forward: Forward) -> None:
        if not self._cut_if_matching():
            await forward(segment)

    def _cut_if_matching(self) -> bool:
        client_id = self.link.session.client_id
        if client_id is None or not client_id.startswith(self.attributes.client_id):
            return False
        self.link.connection.close()
        return True
