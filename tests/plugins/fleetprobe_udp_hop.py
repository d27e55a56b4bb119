"""A hop kind from outside fleetprobe, as a plugin would ship it: JSON datagrams on UDP.

Registered through the entry point ``fleetprobe.hop_kinds`` (the ``.dist-info`` beside
this file), it shows that a hop kind with an error reason of its own (``oversize``) is one
module: the scenario loader accepts its key, the run starts it, and /metrics, report.json
and the summary show its errors without a line of fleetprobe knowing the kind.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fleetprobe.probes.json_paths import PathText
from fleetprobe.probes.observers import HopConfig, Observer, ObserverContext, WatchedHop
from fleetprobe.probes.trace_ids import TraceIdReader, Unmatched, parse_json

OVERSIZE = "oversize"


class UdpHop(HopConfig):
    """``udp: {port: N, trace_id: $.path, max_bytes: 512}``: datagrams on 127.0.0.1:N."""

    port: int
    trace_id: PathText | None = None
    max_bytes: int = 512


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, hop: WatchedHop, context: ObserverContext) -> None:
        self.hop, self.context = hop, context
        self.config: UdpHop = hop.config
        self.reader = TraceIdReader(self.config.trace_id)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        seen_ns = time.monotonic_ns()
        c, h = self.hop.chain_index, self.hop.hop_index
        if len(data) > self.config.max_bytes:
            self.context.events.hop_error(c, h, OVERSIZE)
            return
        body = parse_json(data)
        try:
            trace_id = self.reader.read(body, ())
        except Unmatched as unmatched:
            self.context.tracker.unmatched(c, h, unmatched.reason)
            return
        self.context.tracker.observe(c, h, trace_id, seen_ns, body)


class UdpObserver(Observer, kind="udp", config=UdpHop):
    """Listens on each udp hop's port on loopback."""

    def __init__(self, hops: Any, context: ObserverContext) -> None:
        super().__init__(hops, context)
        self._transports: list[asyncio.BaseTransport] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for hop in self.hops:
            transport, _ = await loop.create_datagram_endpoint(
                lambda hop=hop: _Receiver(hop, self.context),
                local_addr=("127.0.0.1", hop.config.port),
            )
            self._transports.append(transport)

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        for transport in self._transports:
            transport.close()
