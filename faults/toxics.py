"""Toxics: what the fault proxy does to the data of one link.

The classic toxics keep Toxiproxy's names, attributes (integers, milliseconds unless
said otherwise) and behaviour, so its users and its clients need nothing new. A toxic is
declared once on a proxy (:class:`ToxicSpec`) and runs as one :class:`Toxic` per link of
each connection it applies to; ``toxicity`` is the chance that it applies to a link.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fleetprobe.faults.link import Forward, Link, Segment
from fleetprobe.faults.mqtt_frames import Packet


class Attributes(BaseModel):
    """A toxic's attributes; each kind of toxic has its own model."""

    model_config = ConfigDict(extra="forbid")


class ToxicSpec(BaseModel):
    """A toxic as declared on a proxy, in Toxiproxy's JSON shape."""

    model_config = ConfigDict(extra="forbid")

    attributes: dict[str, Any] = Field(default_factory=dict)
    name: str = Field(default="", description="default: <type>_<stream>")
    type: str
    stream: Literal["upstream", "downstream"] = "downstream"
    toxicity: float = Field(default=1.0, ge=0.0, le=1.0)

    @field_validator("stream", mode="before")
    @classmethod
    def _any_case(cls, stream: Any) -> Any:
        return stream.lower() if isinstance(stream, str) else stream

    @model_validator(mode="after")
    def _default_name(self) -> ToxicSpec:
        if not self.name:
            self.name = f"{self.type}_{self.stream}"
        return self

    def checked(self) -> ToxicSpec:
        """This spec with its attributes validated and defaults filled in.

        Raises:
            ValueError: an unknown type or a bad attribute, named.
        """
        kind = Toxic.registry.get(self.type)
        if kind is None:
            raise ValueError("invalid toxic type")  # Toxiproxy's words, which clients match
        try:
            attributes = kind.attributes_model.model_validate(self.attributes)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'attributes'}: {e['msg']}"
                for e in error.errors()
            )
            raise ValueError(f"toxic {self.name!r} ({self.type}): {problems}") from None
        return self.model_copy(update={"attributes": attributes.model_dump()})


class Toxic:
    """One toxic acting on one link. Subclasses register under their ``kind``."""

    registry: ClassVar[dict[str, type[Toxic]]] = {}
    kind: ClassVar[str]
    attributes_model: ClassVar[type[Attributes]]

    def __init_subclass__(
        cls, *, kind: str | None = None, attributes: type[Attributes] = Attributes, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        cls.attributes_model = attributes
        if kind is not None:  # None: a base class for toxics of one family
            cls.kind = kind
            Toxic.registry[kind] = cls

    def __init__(self, spec: ToxicSpec, link: Link) -> None:
        self.name = spec.name
        self.link = link
        self.attributes = self.attributes_model.model_validate(spec.attributes)
        self._timer: asyncio.TimerHandle | None = None

    def attach(self) -> None:
        """Called when the toxic starts acting on its link."""

    def detach(self) -> None:
        """Called when it stops: release what it holds, cancel its timers."""
        if self._timer is not None:
            self._timer.cancel()

    async def push(self, segment: Segment, forward: Forward) -> None:
        """Act on one segment; pass what goes on to ``forward``."""
        await forward(segment)

    async def before_close(self) -> None:
        """Called when the link's source closed, before the connection is closed."""

    def after(self, delay_ms: float, callback: Any) -> None:
        """Call ``callback`` once, ``delay_ms`` from now, unless detached before."""
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay_ms / 1000, callback)


async def sleep_until(deadline: float) -> None:
    """Sleep until the loop's clock reads ``deadline`` (no sleep if it has passed)."""
    delay = deadline - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


class LatencyAttributes(Attributes):
    latency: int = Field(default=0, ge=0)
    jitter: int = Field(default=0, ge=0)


class Latency(Toxic, kind="latency", attributes=LatencyAttributes):
    """Delay every segment by ``latency`` ± ``jitter`` ms from when it was read."""

    attributes: LatencyAttributes

    async def push(self, segment: Segment, forward: Forward) -> None:
        delay_ms: float = self.attributes.latency
        if self.attributes.jitter:
            delay_ms += self.link.rng.uniform(-self.attributes.jitter, self.attributes.jitter)
        await sleep_until(segment.read_at + delay_ms / 1000)
        await forward(segment)


class BandwidthAttributes(Attributes):
    rate: int = Field(default=0, ge=0, description="KB/s (1 KB = 1000 bytes); 0 = unlimited")


class Bandwidth(Toxic, kind="bandwidth", attributes=BandwidthAttributes):
    """Limit the link to ``rate`` KB/s, sending at most 100 ms of data at a time."""

    attributes: BandwidthAttributes

    def __init__(self, spec: ToxicSpec, link: Link) -> None:
        super().__init__(spec, link)
        self._next_send = 0.0

    async def push(self, segment: Segment, forward: Forward) -> None:
        bytes_per_s = self.attributes.rate * 1000
        if bytes_per_s <= 0:
            await forward(segment)
            return
        loop = asyncio.get_running_loop()
        data = segment.data
        piece = max(1, bytes_per_s // 10)
        for start in range(0, len(data), piece):
            chunk = data[start : start + piece]
            self._next_send = max(self._next_send, loop.time()) + len(chunk) / bytes_per_s
            await sleep_until(self._next_send)
            await forward(Segment([Packet(chunk, None)], segment.read_at))


class SlowCloseAttributes(Attributes):
    delay: int = Field(default=0, ge=0)


class SlowClose(Toxic, kind="slow_close", attributes=SlowCloseAttributes):
    """Delay closing the connection by ``delay`` ms after the source closed."""

    attributes: SlowCloseAttributes

    async def before_close(self) -> None:
        await asyncio.sleep(self.attributes.delay / 1000)


class TimeoutAttributes(Attributes):
    timeout: int = Field(default=0, ge=0, description="ms until the connection closes; 0 = never")


class Timeout(Toxic, kind="timeout", attributes=TimeoutAttributes):
    """Drop all data; close the connection after ``timeout`` ms (0: a black hole).

    As in Toxiproxy, removing the toxic closes the connections it acted on: the data it
    dropped is gone, so the stream could not go on intact.
    """

    attributes: TimeoutAttributes

    def attach(self) -> None:
        if self.attributes.timeout > 0:
            self.after(self.attributes.timeout, self.link.connection.close)

    def detach(self) -> None:
        super().detach()
        self.link.connection.close()

    async def push(self, segment: Segment, forward: Forward) -> None:
        return


class ResetPeerAttributes(Attributes):
    timeout: int = Field(default=0, ge=0)


class ResetPeer(Toxic, kind="reset_peer", attributes=ResetPeerAttributes):
    """On the next data (or close) on the link, drop it and reset the connection (TCP RST)
    ``timeout`` ms later."""

    attributes: ResetPeerAttributes

    async def push(self, segment: Segment, forward: Forward) -> None:
        if self._timer is None:
            self.after(self.attributes.timeout, self._reset)

    async def before_close(self) -> None:
        if self._timer is None:
            self.after(self.attributes.timeout, self._reset)
            await asyncio.sleep(self.attributes.timeout / 1000)

    def _reset(self) -> None:
        self.link.connection.close(reset=True)


class SlicerAttributes(Attributes):
    average_size: int = Field(default=0, ge=1, validate_default=True)
    size_variation: int = Field(default=0, ge=0)
    delay: int = Field(default=0, ge=0, description="µs between slices")

    @model_validator(mode="after")
    def _variation_within_size(self) -> SlicerAttributes:
        if self.size_variation > self.average_size:
            raise ValueError("size_variation must not exceed average_size")
        return self


class Slicer(Toxic, kind="slicer", attributes=SlicerAttributes):
    """Cut the data into slices of ``average_size`` ± ``size_variation`` bytes."""

    attributes: SlicerAttributes

    async def push(self, segment: Segment, forward: Forward) -> None:
        average = self.attributes.average_size
        variation = min(self.attributes.size_variation, average - 1)
        data = segment.data
        start = 0
        while start < len(data):
            size = average + self.link.rng.randint(-variation, variation)
            await forward(Segment([Packet(data[start : start + size], None)], segment.read_at))
            start += size
            if self.attributes.delay and start < len(data):
                await asyncio.sleep(self.attributes.delay / 1_000_000)


class LimitDataAttributes(Attributes):
    bytes: int = Field(default=0, ge=0)


class LimitData(Toxic, kind="limit_data", attributes=LimitDataAttributes):
    """Close the connection once ``bytes`` have passed on the link since the toxic came."""

    attributes: LimitDataAttributes

    def __init__(self, spec: ToxicSpec, link: Link) -> None:
        super().__init__(spec, link)
        self._passed = 0

    async def push(self, segment: Segment, forward: Forward) -> None:
        room = self.attributes.bytes - self._passed
        data = segment.data
        if len(data) < room:
            self._passed += len(data)
            await forward(segment)
            return
        if room > 0:
            self._passed += room
            await forward(Segment([Packet(data[:room], None)], segment.read_at))
        self.link.connection.close()
