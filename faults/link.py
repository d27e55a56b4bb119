"""One proxied TCP connection: two links (client to server, server to client).

A link reads from one socket and writes to the other. Reading and writing are two tasks
joined by a short queue, so a toxic that holds data back (latency, bandwidth) delays it
without stopping the reads that timestamp it, and a slow peer pushes back on the sender
through TCP rather than through memory. One task writes each link, in order, so a
sequence of bytes arrives complete and in order whatever toxics come and go.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from random import Random
from typing import TYPE_CHECKING

from fleetprobe.faults.mqtt_frames import MqttFramer, Packet, Session
from fleetprobe.transport.mqtt_codec import PacketType

if TYPE_CHECKING:
    from fleetprobe.faults.toxics import Toxic

log = logging.getLogger("fleetprobe.faults")

READ_SIZE = 65_536
_MAX_QUEUED = 64
"""Segments read ahead of the writer per link; beyond that the link stops reading."""


@dataclass(slots=True)
class Segment:
    """What one read brought, as MQTT packets when the stream is MQTT.

    ``resume_after`` names the toxic that held the segment back and sent it on later: the
    toxics up to it have already acted on it.
    """

    packets: list[Packet]
    read_at: float
    resume_after: Toxic | None = None

    @property
    def data(self) -> bytes:
        """The bytes of the segment, as they go on the wire."""
        if len(self.packets) == 1:
            return self.packets[0].data
        return b"".join(packet.data for packet in self.packets)


Forward = Callable[[Segment], Awaitable[None]]


class Link:
    """One direction of a proxied connection, with the toxics that act on it."""

    def __init__(
        self,
        connection: Connection,
        direction: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.connection = connection
        self.direction = direction
        self.toxics: list[Toxic] = []
        self._reader = reader
        self._writer = writer
        self._framer = MqttFramer(direction)
        self._queue: asyncio.Queue[Segment | None] = asyncio.Queue()
        self._room = asyncio.Event()
        self.sent_bytes = 0

    @property
    def session(self) -> Session:
        """What is known about the MQTT session this link carries."""
        return self.connection.session

    @property
    def rng(self) -> Random:
        """The proxy's random source (toxicity, jitter, probabilities)."""
        return self.connection.rng

    def add(self, toxic: Toxic) -> None:
        """Let ``toxic`` act on the data from now on."""
        self.toxics.append(toxic)
        toxic.attach()

    def remove(self, name: str) -> None:
        """Stop the toxic called ``name``; what it holds back goes on."""
        for toxic in self.toxics:
            if toxic.name == name:
                self.toxics.remove(toxic)
                toxic.detach()
                return

    def inject(self, segment: Segment) -> None:
        """Queue a segment a toxic held back; it resumes after that toxic."""
        self._queue.put_nowait(segment)

    async def run(self) -> None:
        """Carry the data until either side closes; then close the connection."""
        pump = asyncio.create_task(self._pump())
        try:
            await self._read()
            await pump
        finally:
            pump.cancel()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await self._reader.read(READ_SIZE)
            except OSError:
                data = b""
            if not data:
                tail = self._framer.flush()
                if tail:
                    self._queue.put_nowait(Segment([Packet(tail, None)], loop.time()))
                self._queue.put_nowait(None)
                return
            packets = self._framer.feed(data)
            if not packets:
                continue
            if self.session.client_id is None and packets[0].kind == PacketType.CONNECT:
                self.session.learn_connect(packets[0])
            self._queue.put_nowait(Segment(packets, loop.time()))
            while self._queue.qsize() >= _MAX_QUEUED:
                self._room.clear()
                await self._room.wait()

    async def _pump(self) -> None:
        while True:
            segment = await self._queue.get()
            self._room.set()
            if segment is None:
                for toxic in list(self.toxics):
                    await toxic.before_close()
                self.connection.close()
                return
            toxics = tuple(self.toxics)
            start = 0
            if segment.resume_after is not None:
                after = segment.resume_after
                start = toxics.index(after) + 1 if after in toxics else 0
                segment.resume_after = None
            await self._through(toxics, start, segment)

    async def _through(self, toxics: tuple[Toxic, ...], index: int, segment: Segment) -> None:
        if index == len(toxics):
            await self.write(segment.data)
            return

        async def forward(out: Segment) -> None:
            await self._through(toxics, index + 1, out)

        await toxics[index].push(segment, forward)

    async def write(self, data: bytes) -> None:
        """Send ``data`` to the peer, waiting while its buffer is full."""
        if not data or self._writer.is_closing():
            return
        self.sent_bytes += len(data)
        self._writer.write(data)
        await self._writer.drain()


class Connection:
    """A client's connection through the proxy to the upstream server."""

    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        rng: Random,
    ) -> None:
        self.session = Session()
        self.rng = rng
        self._writers = (client[1], server[1])
        self.links = {
            "upstream": Link(self, "upstream", client[0], server[1]),
            "downstream": Link(self, "downstream", server[0], client[1]),
        }
        self.closed = asyncio.Event()

    async def run(self) -> None:
        """Carry both directions until the connection ends."""
        tasks = [asyncio.create_task(link.run()) for link in self.links.values()]
        try:
            await self.closed.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for link in self.links.values():
                for toxic in link.toxics:
                    toxic.detach()
            for writer in self._writers:
                writer.close()

    def close(self, *, reset: bool = False) -> None:
        """End the connection; ``reset`` sends a TCP RST (connection reset by peer)."""
        if self.closed.is_set():
            return
        for writer in self._writers:
            if reset:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    linger = struct.pack("ii", 1, 0)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                writer.transport.abort()
            else:
                writer.close()
        self.closed.set()
