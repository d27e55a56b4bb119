"""What every message-passing stage does with its knobs, and the counts it keeps.

A :class:`StageRunner` takes each unit of work, drops it when the knobs say so, and
otherwise runs it in its own task after the knob's delay and once no stall holds the
stage. Tasks are bounded: past ``backlog`` pending ones, new work is dropped and counted,
so a long stall costs bounded memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from fleetprobe.testbed.knobs import StageKnobs

log = logging.getLogger(__name__)

DEFAULT_BACKLOG = 10_000


class Counters:
    """Counts per stage and event (``forwarded``, ``dropped``, ...), and a way to await them."""

    def __init__(self) -> None:
        self._counts: dict[str, Counter[str]] = {}
        # Set and replaced on a change once a waiter holds it, so each waiter wakes once
        # per change; unwatched, counting creates no events.
        self._changed = asyncio.Event()
        self._watched = False

    def add(self, stage: str, key: str, n: int = 1) -> int:
        """Add ``n`` to a count and return its new value."""
        counts = self._counts.setdefault(stage, Counter())
        counts[key] += n
        if self._watched:
            changed, self._changed, self._watched = self._changed, asyncio.Event(), False
            changed.set()
        return counts[key]

    def get(self, stage: str, key: str) -> int:
        """One count (0 when never counted)."""
        return self._counts.get(stage, Counter())[key]

    def snapshot(self) -> dict[str, dict[str, int]]:
        """A copy of every count, by stage."""
        return {stage: dict(counts) for stage, counts in self._counts.items()}

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` is true; it is checked again after every change."""
        while True:
            changed = self._changed
            self._watched = True
            if predicate():
                return
            await changed.wait()


class StageRunner:
    """Runs a stage's work under its knobs: drop, delay ± jitter, stall, bounded backlog.

    Args:
        stage: the stage's name, for counts and logs.
        knobs: read for every submitted unit of work.
        counters: where ``dropped``, ``backlog_full`` and ``error`` are counted.
        backlog: units of work pending at most.
    """

    def __init__(
        self, stage: str, knobs: StageKnobs, counters: Counters, *, backlog: int = DEFAULT_BACKLOG
    ) -> None:
        self.stage = stage
        self.knobs = knobs
        self.counters = counters
        self.backlog = backlog
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Units of work waiting for their delay, a stall, or in progress."""
        return len(self._pending)

    def submit(self, work: Callable[[], Awaitable[None]], *, arrived_ns: int | None = None) -> bool:
        """Schedule ``work``; False when it was dropped (by the knobs or a full backlog).

        Args:
            work: the stage's action for one message.
            arrived_ns: ``time.monotonic_ns()`` when the message arrived; the delay counts
                from then (now when None).
        """
        if self.knobs.drops():
            self.counters.add(self.stage, "dropped")
            return False
        if len(self._pending) >= self.backlog:
            full = self.counters.add(self.stage, "backlog_full")
            if full == 1 or full % 1000 == 0:  # a stall overflows with every message
                log.warning(
                    "%s backlog full (%d pending); %d dropped so far",
                    self.stage,
                    len(self._pending),
                    full,
                )
            return False
        start_ns = time.monotonic_ns() if arrived_ns is None else arrived_ns
        due_ns = start_ns + round(self.knobs.delay() * 1e9)
        task = asyncio.create_task(self._run(work, due_ns))
        self._pending.add(task)
        task.add_done_callback(self._done)
        return True

    async def aclose(self) -> None:
        """Cancel all pending work and wait until it has stopped."""
        pending = list(self._pending)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _run(self, work: Callable[[], Awaitable[None]], due_ns: int) -> None:
        wait_s = (due_ns - time.monotonic_ns()) / 1e9
        if wait_s > 0:
            await asyncio.sleep(wait_s)  # the knob's delay itself, not a synchronisation
        # After the delay, so a stall that began meanwhile holds this message too.
        await self.knobs.wait_unstalled()
        await work()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:  # a bug in the stage's work: count it and keep the stage up
            self.counters.add(self.stage, "error")
            log.error("%s failed on a message", self.stage, exc_info=error)
