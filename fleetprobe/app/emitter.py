"""From the fleet's emissions to sent, followed signals: stamp, register, publish, and
emit ``signal_sent`` or ``not_sent`` for each."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from fleetprobe.core.blind_spans import TOLERANCE_NS, BlindSpans
from fleetprobe.core.events import RunEvents
from fleetprobe.core.queues import QueueState
from fleetprobe.core.results import SATURATED
from fleetprobe.probes.tracker import Tracker
from fleetprobe.simulator.faults import FleetFaults, Held, malform
from fleetprobe.simulator.fleet import Emission
from fleetprobe.simulator.publisher import READY_WAIT_S, MqttPublisher, Outgoing
from fleetprobe.transport.errors import SendError

MAX_UNACKED = 1_000
MAX_WAITING = 100_000
"""Signals that may wait for their vehicle's session to reconnect; past it they fail."""
TRACKER_FULL = "tracker_full"
BACKLOG_FULL = "backlog_full"
INTERRUPTED = "interrupted"
SHED_LAG_NS = 100_000_000
"""Emission lag past which the prober follows only one signal in ``FOLLOW_ONE_IN`` and
sends the others without following them, until it has caught up: it then spends little
on them but the send."""
FOLLOW_ONE_IN = 16
READ_FIRST_AFTER_NS = 20_000_000
"""A backlog shorter than this is a read or two from gone: waiting for it costs a loop turn
per signal (at 8,000 signals/s it took emission lag p99 from 9 ms to 90 ms)."""
READ_FIRST_S = TOLERANCE_NS / 1e9
"""The longest the fleet waits for the observers to read what reached them (what they
do not read, the platform may drop, and what they read late is stamped late); an
observer behind for longer than that is falling behind, and the prober sheds instead."""


class Emitter:
    """Hands each emission to the publisher and the signal to every chain that follows it.

    A signal is stamped as sent, and followed, only once its bytes can leave: QoS 0 when
    the socket takes more, QoS 1 and 2 once the session has a free in-flight slot. Waiting
    for that is the prober's time (emission lag), never a hop's latency. QoS 0 messages
    are written in line; QoS 1 and 2 wait for their slot and ack in tasks, at most
    ``MAX_UNACKED`` at a time: past that the emitter waits, and the emission lag shows the
    back-pressure instead of hiding it.

    The prober protects its measurements before its schedule: once an observer has had
    bytes waiting in its socket for ``READ_FIRST_AFTER_NS``, the fleet waits (a late send
    is only emission lag; a late read would be a wrong latency, and unread bytes a broker
    may drop). When it cannot keep its schedule for want of CPU (emission lag over
    ``SHED_LAG_NS`` while its loop is busy, or an observer behind for longer than the
    blind-span tolerance), it follows one signal in ``FOLLOW_ONE_IN`` and sends the others
    without following them (``not_followed``, reason ``saturated``).
    """

    def __init__(
        self,
        publisher: MqttPublisher,
        tracker: Tracker,
        events: RunEvents,
        faults: FleetFaults | None = None,
        *,
        reconnect_backlog: int = MAX_WAITING,
        blind: BlindSpans | None = None,
        loop_busy: Callable[[], bool] = lambda: True,
    ) -> None:
        """``blind``: when the observers fell behind what they receive; ``loop_busy``:
        whether the loop is short of CPU (then a late schedule is the prober's, not a
        platform's back-pressure)."""
        self._publisher = publisher
        self._blind = blind
        self._loop_busy = loop_busy
        self._reconnect_backlog = reconnect_backlog
        self._tracker = tracker
        self._events = events
        self._faults = faults or FleetFaults()
        self._chains_of: dict[str, list[int]] = defaultdict(list)
        for index, chain in enumerate(tracker.chains):
            self._chains_of[chain.signal].append(index)
        self._unacked = asyncio.Semaphore(MAX_UNACKED)
        self._unacked_count = 0
        self._pending: set[asyncio.Task[None]] = set()
        self._waiting = 0
        self._overflowed = {TRACKER_FULL: 0, BACKLOG_FULL: 0}
        self._saturated_count = 0

    @property
    def queues(self) -> dict[str, QueueState]:
        """The emitter's bounded queues: signals in flight (admitted to the tracker), QoS 1/2
        sends awaiting their acks (full means waiting: back-pressure, never loss), and
        signals waiting for their vehicle to reconnect."""
        tracker = self._tracker
        return {
            "tracker": QueueState(
                tracker.inflight_total, tracker.capacity, self._overflowed[TRACKER_FULL]
            ),
            "qos_acks": QueueState(self._unacked_count, MAX_UNACKED),
            "reconnect_wait": QueueState(
                self._waiting, self._reconnect_backlog, self._overflowed[BACKLOG_FULL]
            ),
        }

    async def emit(self, emission: Emission, intended_ns: int, *, held: bool = False) -> None:
        """Send one emission that was due at ``intended_ns`` (monotonic).

        ``held``: an offline vehicle kept it until now; it is late on purpose, so its
        delay is not the prober's emission lag.
        """
        faults = self._faults
        if faults.any_active and not held and faults.hold(emission, intended_ns):
            return
        blind = self._blind
        if blind is not None and blind.behind:
            # Behind for a moment is one read away from caught up; behind for a while, the
            # reads come first; behind past the tolerance, the prober sheds instead (below).
            behind_ns = blind.behind_for_ns(time.monotonic_ns())
            if READ_FIRST_AFTER_NS <= behind_ns < TOLERANCE_NS:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(READ_FIRST_S):
                        await blind.caught_up()
        if not self._publisher.ready(emission.vin):
            given_up = self._publisher.given_up(emission.vin)
            if given_up is not None:
                self._not_sent(emission, given_up)
                return
            if self._waiting >= self._reconnect_backlog:
                self._overflow(emission, BACKLOG_FULL)
                return
            # Reconnecting: the vehicle sends once it is back, and the wait is the fault's.
            self._waiting += 1
            waiting = asyncio.create_task(self._emit_when_ready(emission, intended_ns))
            self._pending.add(waiting)
            waiting.add_done_callback(self._pending.discard)
            return
        qos = self._publisher.signals[emission.signal].qos
        if qos:
            # At most MAX_UNACKED sends wait for a slot or an ack; past it the fleet waits,
            # which shows as emission lag: the prober's back-pressure, never a hop's latency.
            await self._unacked.acquire()
            self._unacked_count += 1
            task = asyncio.create_task(self._send_acknowledged(emission, intended_ns, qos, held))
            self._pending.add(task)
            task.add_done_callback(self._acked)
            return
        # Room in the socket before the stamp: a full send buffer is the prober's wait.
        try:
            await self._publisher.writable(emission.vin)
        except SendError as error:  # the connection dropped before the publisher noticed
            self._not_sent(emission, error.reason)
            return
        prepared = self._prepare(emission, intended_ns, held)
        if prepared is not None:
            await self._send(*prepared)

    async def _send_acknowledged(
        self, emission: Emission, intended_ns: int, qos: int, held: bool
    ) -> None:
        """Send a QoS 1/2 emission once its session has a free in-flight slot (the broker's
        Receive Maximum), stamped only then, and wait for its acknowledgement."""
        try:
            async with self._publisher.send_slot(emission.vin, qos):
                prepared = self._prepare(emission, intended_ns, held)
                if prepared is not None:
                    await self._send(*prepared, slot_held=True)
        except SendError as error:  # the session went away while it waited for a slot
            self._not_sent(emission, error.reason)
        except asyncio.CancelledError:  # the run was stopped while it waited for a slot
            self._not_sent(emission, INTERRUPTED)

    def _prepare(
        self, emission: Emission, intended_ns: int, held: bool
    ) -> tuple[Outgoing, int | None, list[int], int] | None:
        """Stamp ``emission`` as sent now and follow it: the outgoing message, its emission
        lag (None when held back on purpose), the chains following it and how many copies
        to send. None when the tracker is full: it is not sent (counted)."""
        if self._tracker.full and self._followers(emission):
            self._overflow(emission, TRACKER_FULL)  # it could not be followed
            return None
        faults = self._faults
        skew_ns = faults.skew_ns(emission.vin) if faults.any_active else 0
        outgoing = self._publisher.prepare(emission, intended_ns, clock_skew_ns=skew_ns)
        copies = 1
        followed: list[int] = []
        lag_ns = None if held else outgoing.sent_ns - intended_ns
        if faults.any_active and faults.malformed():
            # A broken payload carries no readable trace id: nothing can follow it.
            outgoing.payload = malform(outgoing.payload)
        else:
            if self._saturated(lag_ns, outgoing.sent_ns):
                self._shed(emission, outgoing.sent_ns)
            else:
                followed = self._follow(emission, intended_ns, outgoing)
            copies = 2 if faults.any_active and faults.duplicated() else 1
        return outgoing, lag_ns, followed, copies

    def _saturated(self, lag_ns: int | None, now_ns: int) -> bool:
        """Whether the prober is too far behind to follow this signal: its observers fell
        behind, or its schedule slipped for want of CPU (a platform that holds the fleet
        back, by its acks or its socket, makes a late schedule that is no reason to shed)."""
        if self._blind is not None and self._blind.falling_behind(now_ns):
            return True
        if lag_ns is None or lag_ns <= SHED_LAG_NS or not self._loop_busy():
            return False
        self._saturated_count += 1
        return self._saturated_count % FOLLOW_ONE_IN != 0

    def _shed(self, emission: Emission, sent_ns: int) -> None:
        """Send ``emission`` without following it."""
        chains = self._followers(emission)
        if chains:
            for index in chains:
                self._tracker.shed(index, emission.trace_id, sent_ns)
            self._events.not_followed(emission.signal, SATURATED, chains)

    async def _emit_when_ready(self, emission: Emission, intended_ns: int) -> None:
        try:
            async with asyncio.timeout(READY_WAIT_S):
                await self._publisher.wait_ready(emission.vin)
        except TimeoutError:
            # Still not connected: the platform could not take the signal.
            self._not_sent(emission, self._publisher.given_up(emission.vin) or "disconnected")
            return
        except asyncio.CancelledError:
            self._not_sent(emission, INTERRUPTED)  # the run was stopped while it waited
            return
        finally:
            self._waiting -= 1
        await self.emit(emission, intended_ns, held=True)

    def _overflow(self, emission: Emission, queue_full: str) -> None:
        self._overflowed[queue_full] += 1
        self._not_sent(emission, queue_full)

    def _not_sent(self, emission: Emission, reason: str) -> None:
        """A signal that was never handed over: a send error, and unsent where followed."""
        self._events.not_sent(emission.signal, reason, self._followers(emission))

    async def release(self, held: list[Held]) -> None:
        """Send what offline vehicles held, in the order they meant to send it."""
        for signal in held:
            await self.emit(signal.emission, signal.intended_ns, held=True)

    def _followers(self, emission: Emission) -> list[int]:
        """The chains that follow this emission (its kind, and within their sample)."""
        return [
            index
            for index in self._chains_of[emission.signal]
            if self._tracker.chains[index].follows(emission.trace_id)
        ]

    def _follow(self, emission: Emission, intended_ns: int, outgoing: Outgoing) -> list[int]:
        followed = self._followers(emission)
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
        return followed

    async def flush(self, stop: asyncio.Future[None] | None = None) -> None:
        """Wait until every QoS 1/2 send has been acknowledged or has failed; when ``stop``
        is done first, give up the rest (counted as send errors ``interrupted``)."""
        while self._pending:  # a reconnected vehicle's send may start another wait
            waiting: asyncio.Future[Any] = asyncio.gather(*self._pending, return_exceptions=True)
            if stop is None:
                await waiting
                continue
            await asyncio.wait([waiting, stop], return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                for task in list(self._pending):
                    task.cancel()
                await waiting
                return

    def _acked(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        self._unacked_count -= 1
        self._unacked.release()

    async def _send(
        self,
        outgoing: Outgoing,
        lag_ns: int | None,
        followed: list[int],
        copies: int,
        *,
        slot_held: bool = False,
    ) -> None:
        lag_s = None if lag_ns is None else max(0.0, lag_ns / 1e9)
        try:
            for _ in range(copies):
                await self._publisher.send(outgoing, slot_held=slot_held)
        except SendError as error:
            self._send_failed(outgoing, lag_s, followed, error.reason)
            return
        except asyncio.CancelledError:
            self._send_failed(outgoing, lag_s, followed, INTERRUPTED)  # stopped while acked
            return
        self._sent(outgoing, lag_s)

    def _sent(self, outgoing: Outgoing, lag_s: float | None) -> None:
        self._events.signal_sent(outgoing.emission.signal, lag_s)

    def _send_failed(
        self, outgoing: Outgoing, lag_s: float | None, followed: list[int], reason: str
    ) -> None:
        """The publish failed: the signal is unsent, unless a hop saw it anyway (then it
        was sent after all and keeps its verdict: one verdict per signal sent)."""
        trace_id = outgoing.emission.trace_id
        forgotten = [i for i in followed if self._tracker.forget(i, trace_id)]
        if len(forgotten) < len(followed):
            self._sent(outgoing, lag_s)
            return
        self._events.not_sent(outgoing.emission.signal, reason, forgotten)
