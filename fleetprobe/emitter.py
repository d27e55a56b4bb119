"""From the fleet's emissions to sent, followed signals: stamp, register, publish, account."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from exporters.metrics import ProbeMetrics
from exporters.results import ResultBook
from probes.tracker import Tracker
from simulator.fleet import Emission
from simulator.publisher import MqttPublisher, Outgoing
from transport.errors import SendError

MAX_UNACKED = 1_000


class Emitter:
    """Hands each emission to the publisher and the signal to every chain that follows it.

    QoS 0 messages are written in line. QoS 1 and 2 messages wait for their acks in tasks,
    at most ``MAX_UNACKED`` at a time: past that the emitter waits, and the emission lag
    shows the back-pressure instead of hiding it.
    """

    def __init__(
        self, publisher: MqttPublisher, tracker: Tracker, metrics: ProbeMetrics, book: ResultBook
    ) -> None:
        self._publisher = publisher
        self._tracker = tracker
        self._metrics = metrics
        self._book = book
        self._chains_of: dict[str, list[int]] = defaultdict(list)
        for index, chain in enumerate(tracker.chains):
            self._chains_of[chain.signal].append(index)
        self._unacked = asyncio.Semaphore(MAX_UNACKED)
        self._pending: set[asyncio.Task[None]] = set()

    async def emit(self, emission: Emission, intended_ns: int) -> None:
        """Send one emission that was due at ``intended_ns`` (monotonic)."""
        qos = self._publisher.signals[emission.signal].qos
        if qos:
            # Wait for room before the stamp: the wait is the prober's, shown as emission lag.
            await self._unacked.acquire()
        outgoing = self._publisher.prepare(emission, intended_ns)
        followed = [
            index
            for index in self._chains_of[emission.signal]
            if self._tracker.chains[index].follows(emission.trace_id)
        ]
        for index in followed:
            self._tracker.follow(
                index,
                emission.trace_id,
                emission.signal,
                emission.vin,
                intended_ns,
                outgoing.sent_ns,
                outgoing.sent_wall_ns,
                emission.fields,
            )
        if qos == 0:
            await self._send(outgoing, intended_ns, followed)
            return
        task = asyncio.create_task(self._send(outgoing, intended_ns, followed))
        self._pending.add(task)
        task.add_done_callback(self._acked)

    async def flush(self) -> None:
        """Wait until every QoS 1/2 send has been acknowledged or has failed."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def _acked(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        self._unacked.release()

    async def _send(self, outgoing: Outgoing, intended_ns: int, followed: list[int]) -> None:
        signal = outgoing.emission.signal
        try:
            await self._publisher.send(outgoing)
        except SendError as error:
            for index in followed:
                if self._tracker.forget(index, outgoing.emission.trace_id):
                    self._book.unsent(index)
            self._metrics.send_error(signal, error.reason)
            self._book.send_error(signal, error.reason)
            return
        lag_s = max(0.0, (outgoing.sent_ns - intended_ns) / 1e9)
        self._metrics.signal_sent(signal, lag_s)
        self._book.signal_sent(signal, lag_s)
