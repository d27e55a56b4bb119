"""The tracker: the table of signals in flight, their deadlines, and their verdicts.

Observers report what they saw (:meth:`Tracker.observe`); the tracker alone judges order,
expectations and deadlines, and emits what it finds as run events (a verdict, a retired
signal, a duplicate, an unmatched message). Each hop has a FIFO queue of the signals that
wait for it. Signals are followed in send order and a hop's ``within`` is the same for all
of them, so each queue is sorted by deadline: expiring is O(1) per signal, with no timer
per signal.

A signal's verdict is given as soon as every hop has a result; the signal stays in the
table until its chain's last deadline, so a repeat sighting still counts as a duplicate,
and then it is retired (the trace log writes it).

The tracker never blames the platform for the prober's own limits: a deadline is expired
only once every observer has taken in what it received before it (the sweep's
*watermark*), and what the prober's blind spans (:mod:`fleetprobe.core.blind_spans`) may
have hidden is ``inconclusive``, never a failure.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from fleetprobe.core.blind_spans import BlindSpans
from fleetprobe.core.events import RunEvents
from fleetprobe.core.results import FAILURES, FollowedSignal, HopResult, Verdict
from fleetprobe.probes.chains import ChainSpec
from fleetprobe.probes.trace_ids import LATE, MISSING, UNKNOWN_TRACE_ID

CAPACITY = 2_000_000
"""Signals in flight at most (~400 bytes each: 800 MB); past it new ones are not sent."""

ORDER_TOLERANCE_S = 0.05
"""How much earlier than a previous hop a hop may be seen and still be in order. Two outputs
of one stage (a state topic and a state API) are seen by different means, polling among
them, so their sightings can swap by a few milliseconds without anything being wrong."""


class Tracker:
    """Follows signals through the hops of every chain."""

    def __init__(
        self,
        chains: Sequence[ChainSpec],
        events: RunEvents,
        owns: Callable[[str], bool] | None = None,
        capacity: int = CAPACITY,
        counts_anonymous: bool = True,
        blind: BlindSpans | None = None,
        made_here: Callable[[str], bool] | None = None,
    ) -> None:
        """``owns(trace_id)`` says whether an id nobody follows is this tracker's to count
        as unmatched; under sharding, other shards' ids are not (default: all are).
        ``counts_anonymous``: whether messages without a readable id are this tracker's to
        count (every shard sees them; one shard counts them). ``capacity`` bounds the
        signals in flight (see :attr:`full`). ``blind``: when the prober could not see
        (None: it always could). ``made_here(trace_id)``: whether an id is one this run
        made, so that a sighting of it after it was forgotten is late, not unknown."""
        self.chains = tuple(chains)
        self.capacity = capacity
        self._blind = blind
        self._made_here = made_here
        self._counts_anonymous = counts_anonymous
        self._events = events
        self._owns = owns
        self._tables: list[dict[str, FollowedSignal]] = [{} for _ in self.chains]
        self._within_ns = [[round(h.within_s * 1e9) for h in c.hops] for c in self.chains]
        self._order_tolerance_ns = round(ORDER_TOLERANCE_S * 1e9)
        self._queues: list[list[deque[FollowedSignal]]] = [
            [deque() for _ in c.hops] for c in self.chains
        ]
        # Per latest-only hop, each vehicle's signals waiting there, oldest first.
        self._waiting_by_vin: list[list[dict[str, deque[FollowedSignal]] | None]] = [
            [{} if h.latest else None for h in c.hops] for c in self.chains
        ]
        # Retired ids stay known for one more chain deadline, so that a sighting that comes
        # after the verdict is counted as late, not as an id nobody follows; so do the ids
        # of signals sent but not followed, whose sightings are nobody's to count.
        self._retired = [_RecentIds() for _ in self.chains]
        self._shed = [_RecentIds() for _ in self.chains]

    def inflight(self, chain_index: int) -> int:
        """Signals of a chain that are still in the table."""
        return len(self._tables[chain_index])

    @property
    def inflight_total(self) -> int:
        """Signals in the table, over every chain."""
        return sum(map(len, self._tables))

    @property
    def full(self) -> bool:
        """Whether the table holds ``capacity`` signals: the sender must not add more."""
        return self.inflight_total >= self.capacity

    @property
    def idle(self) -> bool:
        """True when no signal is in flight in any chain."""
        return not any(self._tables)

    def follow(
        self,
        chain_index: int,
        trace_id: str,
        signal: str,
        vin: str,
        intended_ns: int,
        sent_ns: int,
        sent_wall_ns: int,
        fields: Mapping[str, Any],
    ) -> None:
        """Start following a signal that is about to be sent at ``sent_ns``.

        ``intended_ns`` and ``sent_ns`` are monotonic, ``sent_wall_ns`` the wall clock.
        """
        chain = self.chains[chain_index]
        followed = FollowedSignal(
            chain_index,
            len(chain.hops),
            trace_id,
            signal,
            vin,
            intended_ns,
            sent_ns,
            sent_wall_ns,
            fields if chain.needs_fields else None,
        )
        self._tables[chain_index][trace_id] = followed
        for queue in self._queues[chain_index]:
            queue.append(followed)
        for hop_index, by_vin in enumerate(self._waiting_by_vin[chain_index]):
            if by_vin is not None:
                waiting = by_vin.setdefault(vin, deque())
                while waiting and waiting[0].results[hop_index] is not None:
                    waiting.popleft()  # judged meanwhile: keeps the lists short
                waiting.append(followed)

    def shed(self, chain_index: int, trace_id: str, sent_ns: int) -> None:
        """A signal sent at ``sent_ns`` that is not followed (the prober could not keep
        up): its sightings are not counted as anything."""
        self._shed[chain_index].add(trace_id, sent_ns + 2 * self._within_ns[chain_index][-1])

    def forget(self, chain_index: int, trace_id: str) -> bool:
        """Stop following a signal whose send failed: it gets no verdict.

        Returns:
            True when it was forgotten; False when it was not followed or already seen.
        """
        followed = self._tables[chain_index].get(trace_id)
        if followed is None or followed.verdict is not None or any(followed.seen_ns):
            return False  # already seen somewhere: it was sent after all, and keeps its verdict
        del self._tables[chain_index][trace_id]
        followed.verdict = Verdict.ABORTED  # its queue entries are skipped
        return True

    def observe(
        self, chain_index: int, hop_index: int, trace_id: str, seen_ns: int, body: Any = MISSING
    ) -> None:
        """A hop saw ``trace_id`` at ``seen_ns``; ``body`` is the parsed body, if readable."""
        followed = self._tables[chain_index].get(trace_id)
        if followed is None:
            self._not_followed(chain_index, hop_index, trace_id)
            return
        if followed.seen_ns[hop_index]:
            self._count_duplicate(followed, hop_index)
            return
        if followed.results[hop_index] is not None:
            self._events.unmatched(chain_index, hop_index, LATE)
            return
        deadline_ns = followed.sent_ns + self._within_ns[chain_index][hop_index]
        earliest_ns = self._blind.earliest_arrival(seen_ns) if self._blind else None
        if seen_ns >= deadline_ns:
            if earliest_ns is not None and earliest_ns < deadline_ns:
                # Read late by a blind prober: it may have arrived in time, or not.
                followed.seen_ns[hop_index] = seen_ns
                followed.uncertain |= 1 << hop_index
                self._set_result(followed, hop_index, HopResult.INCONCLUSIVE)
                return
            # Seen after its deadline but before the sweep got to it: still a timeout.
            self._events.unmatched(chain_index, hop_index, LATE)
            self._set_result(followed, hop_index, HopResult.TIMEOUT)
            return
        if earliest_ns is not None:
            followed.uncertain |= 1 << hop_index  # in time, but how early is not known
        # A poll answer back-dated by its wait for a connection can predate a signal sent
        # meanwhile; nothing is seen before it was sent.
        followed.seen_ns[hop_index] = seen_ns = max(seen_ns, followed.sent_ns + 1)
        result = self._judge(followed, hop_index, body)
        if None in followed.results[:hop_index]:
            # An earlier hop has no result yet: whether this one is in order is known then.
            if followed.held is None:
                followed.held = {}
            followed.held[hop_index] = result
        else:
            self._set_result(followed, hop_index, result)
        by_vin = self._waiting_by_vin[chain_index][hop_index]
        if by_vin is not None:
            self._supersede_older(by_vin.get(followed.vin), followed, hop_index)

    def pending(self, chain_index: int, hop_index: int) -> Iterator[FollowedSignal]:
        """The followed signals still waiting to be seen at a hop, oldest first."""
        for followed in self._queues[chain_index][hop_index]:
            unseen = not followed.seen_ns[hop_index] and followed.results[hop_index] is None
            if unseen and followed.verdict is not Verdict.ABORTED:
                yield followed

    def unmatched(self, chain_index: int, hop_index: int, reason: str) -> None:
        """A hop saw something it could not read a trace id from."""
        if self._counts_anonymous:
            self._events.unmatched(chain_index, hop_index, reason)

    def expire(self, now_ns: int) -> None:
        """Time out every hop whose deadline has passed, and retire finished signals.

        ``now_ns`` is the watermark: every observer has taken in what it received before.
        A hop whose wait overlapped a backlog of the prober is inconclusive, not a timeout.
        """
        for recent in (*self._retired, *self._shed):
            recent.forget_until(now_ns)
        blind = self._blind
        for chain_index, queues in enumerate(self._queues):
            within = self._within_ns[chain_index]
            last = len(queues) - 1
            for hop_index, queue in enumerate(queues):
                deadline_offset = within[hop_index]
                while queue and queue[0].sent_ns + deadline_offset <= now_ns:
                    followed = queue.popleft()
                    if followed.verdict is Verdict.ABORTED:
                        continue
                    if followed.results[hop_index] is None and not followed.seen_ns[hop_index]:
                        deadline_ns = followed.sent_ns + deadline_offset
                        lost = blind is not None and blind.may_have_lost(
                            followed.sent_ns, deadline_ns
                        )
                        result = HopResult.INCONCLUSIVE if lost else HopResult.TIMEOUT
                        print("EXPIRE", now_ns / 1e9, deadline_ns / 1e9, result)
                        self._set_result(followed, hop_index, result)
                    if hop_index == last:
                        self._retire(followed)

    def next_deadline_ns(self) -> int | None:
        """The earliest pending deadline, or None when nothing waits."""
        heads = [
            queue[0].sent_ns + self._within_ns[c][h]
            for c, queues in enumerate(self._queues)
            for h, queue in enumerate(queues)
            if queue
        ]
        return min(heads, default=None)

    def abort_all(self) -> None:
        """End every signal still in flight (the run was interrupted).

        Signals whose hops all have a result keep their verdict; the others are
        ``aborted``, which is not counted as a failure of the platform.
        """
        for table in self._tables:
            for followed in list(table.values()):
                if followed.verdict is None:
                    followed.verdict = Verdict.ABORTED
                    self._events.verdict(followed)
                self._retire(followed)
        for queues in self._queues:
            for queue in queues:
                queue.clear()

    def _set_result(self, followed: FollowedSignal, hop_index: int, result: HopResult) -> None:
        """Give a hop its result, then judge the held hops that were waiting for it."""
        followed.results[hop_index] = result
        held = followed.held
        while held:
            later = min(held)
            if None in followed.results[:later]:
                break
            result = held.pop(later)
            limit = followed.seen_ns[later] + self._order_tolerance_ns
            after = [h for h, seen in enumerate(followed.seen_ns[:later]) if seen > limit]
            if after:
                # An earlier hop read late by a blind prober may only seem to come after.
                late_read = any(not followed.latency_known(h) for h in after)
                result = HopResult.INCONCLUSIVE if late_read else HopResult.OUT_OF_ORDER
            followed.results[later] = result
        self._complete_if_judged(followed)

    def _judge(self, followed: FollowedSignal, hop_index: int, body: Any) -> HopResult:
        """The result of a sighting by its body: ok, or invalid if an expectation fails."""
        hop = self.chains[followed.chain_index].hops[hop_index]
        if hop.expectations:
            if body is MISSING or followed.fields is None:
                followed.add_detail(hop_index, "body is not JSON")
                return HopResult.INVALID
            for expectation in hop.expectations:
                mismatch = expectation.mismatch(body, followed.fields)
                if mismatch is not None:
                    followed.add_detail(hop_index, mismatch)
                    return HopResult.INVALID
        return HopResult.OK

    def _supersede_older(
        self, waiting: deque[FollowedSignal] | None, seen: FollowedSignal, hop_index: int
    ) -> None:
        """Signals of the same vehicle sent before ``seen`` will never show at a latest-only
        hop: they are superseded, which is not a failure."""
        while waiting and waiting[0].sent_ns <= seen.sent_ns:
            older = waiting.popleft()
            unseen = not older.seen_ns[hop_index] and older.results[hop_index] is None
            if older is not seen and unseen:
                self._set_result(older, hop_index, HopResult.SUPERSEDED)

    def _complete_if_judged(self, followed: FollowedSignal) -> None:
        """Failed at the first failing hop; else inconclusive when a hop could not be
        judged; else ok."""
        if followed.verdict is not None or None in followed.results:
            return
        for hop_index, result in enumerate(followed.results):
            if result in FAILURES:
                followed.verdict, followed.failed_hop = Verdict.FAILED, hop_index
                break
        else:
            inconclusive = HopResult.INCONCLUSIVE in followed.results
            followed.verdict = Verdict.INCONCLUSIVE if inconclusive else Verdict.OK
        self._events.verdict(followed)

    def _retire(self, followed: FollowedSignal) -> None:
        c = followed.chain_index
        if self._tables[c].pop(followed.trace_id, None) is None:
            return
        self._retired[c].add(followed.trace_id, followed.sent_ns + 2 * self._within_ns[c][-1])
        self._events.retired(followed)

    def _count_duplicate(self, followed: FollowedSignal, hop_index: int) -> None:
        if followed.duplicates is None:
            followed.duplicates = {}
        followed.duplicates[hop_index] = followed.duplicates.get(hop_index, 0) + 1
        self._events.duplicate(followed.chain_index, hop_index)

    def _not_followed(self, chain_index: int, hop_index: int, trace_id: str) -> None:
        # Ids of other chains, or of signals this chain does not sample, are not ours to count.
        if not self.chains[chain_index].follows(trace_id):
            return
        if any(trace_id in table for table in self._tables):
            return
        if self._owns is not None and not self._owns(trace_id):
            return
        if trace_id in self._shed[chain_index]:
            return
        late = trace_id in self._retired[chain_index] or (
            self._made_here is not None and self._made_here(trace_id)
        )
        self._events.unmatched(chain_index, hop_index, LATE if late else UNKNOWN_TRACE_ID)


class _RecentIds:
    """Trace ids remembered until a time of their own (monotonic ns), in that order."""

    __slots__ = ("_ids", "_order")

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._order: deque[tuple[int, str]] = deque()

    def add(self, trace_id: str, forget_at_ns: int) -> None:
        self._ids[trace_id] = forget_at_ns
        self._order.append((forget_at_ns, trace_id))

    def __contains__(self, trace_id: str) -> bool:
        return trace_id in self._ids

    def forget_until(self, now_ns: int) -> None:
        order = self._order
        while order and order[0][0] <= now_ns:
            self._ids.pop(order.popleft()[1], None)


async def sweep_deadlines(
    tracker: Tracker,
    done: Callable[[], bool],
    max_interval_s: float = 0.01,
    watermark: Callable[[int], int] | None = None,
) -> None:
    """Expire the tracker's deadlines as they come, until ``done()`` is true.

    Sleeps until the earliest pending deadline, but never longer than ``max_interval_s``
    (a signal followed meanwhile may bring an earlier one), so a timeout is declared
    within a few milliseconds of its deadline. ``watermark(now)``: the time up to which
    every observer has taken in what it received (default: now); no deadline after it is
    expired, so what the prober has not read yet never times out.
    """
    while True:
        now_ns = time.monotonic_ns()
        tracker.expire(now_ns if watermark is None else min(now_ns, watermark(now_ns)))
        if done():
            return
        next_ns = tracker.next_deadline_ns()
        wait_s = max_interval_s if next_ns is None else (next_ns - now_ns) / 1e9
        await asyncio.sleep(min(max(wait_s, 0.0005), max_interval_s))
