"""When the prober could not see what reached it: its blind spans.

A prober whose loop is held up (an overloaded machine, a long pause) stamps what it reads
late, and one that reads slower than the platform delivers leaves bytes waiting in its
socket, until a broker whose subscriber does not keep up starts to drop what it cannot
deliver. Neither is the platform's doing. Each such span of monotonic time is recorded
here, and the tracker reads them so as never to blame the platform for them:

- something read during a span, or as it ended, may have arrived at any time in it: if
  its hop's deadline falls in between, the hop is ``inconclusive``; if it was in time,
  it is ok but its latency is unknown.
- a hop that times out while a *backlog* span overlapped its wait is ``inconclusive``:
  what the prober could not take, the platform may have dropped.

Spans shorter than :data:`TOLERANCE_NS` are not recorded: within it, the prober's stamps
count as exact.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

TOLERANCE_NS = 50_000_000
"""The shortest blind span that counts (50 ms): one turn of a busy loop, a collector
pause or a scheduler hiccup of a shared machine is shorter, and a deadline a few
milliseconds off changes no verdict worth having."""
STALL = "stall"
"""The prober's loop ran late: what arrived meanwhile was read (and stamped) late."""
BACKLOG = "backlog"
"""A receiving socket or queue held more than the prober had read: it fell behind the
platform, which may drop what its subscriber cannot take."""

HEARTBEAT_S = 0.01
"""How often :func:`watch_loop` looks at the clock: a stall is known to within this."""
_READ_EDGE_NS = 1_000_000
"""A read stamped this shortly after a span ended still belongs to it (the span's end is
noted after the reads of the same loop turn)."""


class BlindSpan(NamedTuple):
    """A closed span of monotonic time in which the prober was blind."""

    start_ns: int
    end_ns: int
    cause: str


class BlindSpans:
    """The recent blind spans of a run, closed and still open.

    Args:
        keep_ns: how long a closed span is kept: at least as long as the longest wait
            of a chain, so that every signal sent during it can still be judged.
        on_span: told of every span that closes (the saturation watch counts them).
    """

    def __init__(self, keep_ns: int, on_span: Callable[[BlindSpan], None] | None = None) -> None:
        self._keep_ns = keep_ns
        self._on_span = on_span
        self._closed: deque[BlindSpan] = deque()
        self._open: dict[str, int] = {}  # source -> since when (backlogs)
        self._caught_up: asyncio.Event | None = None  # made on the loop, when first awaited
        self._last_end_ns = 0
        self._last_beat_ns: int | None = None  # when the loop last ran its heartbeat

    def add(self, start_ns: int, end_ns: int, cause: str) -> None:
        """Record a closed span (ignored when shorter than the tolerance)."""
        if end_ns - start_ns < TOLERANCE_NS:
            return
        span = BlindSpan(start_ns, end_ns, cause)
        self._closed.append(span)
        self._last_end_ns = max(self._last_end_ns, end_ns)
        while self._closed and self._closed[0].end_ns < end_ns - self._keep_ns:
            self._closed.popleft()
        if self._on_span is not None:
            self._on_span(span)

    def beat(self, now_ns: int) -> None:
        """The loop ran its heartbeat at ``now_ns`` (see :class:`LoopWatch`)."""
        self._last_beat_ns = now_ns

    def open(self, source: str, since_ns: int) -> None:
        """``source`` has been behind since ``since_ns`` and still is (a backlog)."""
        self._open.setdefault(source, since_ns)
        if self._caught_up is not None:
            self._caught_up.clear()

    def close(self, source: str, end_ns: int, since_ns: int | None = None) -> None:
        """``source`` caught up at ``end_ns``, behind since it was opened (or, when it was
        not, since ``since_ns``)."""
        since_ns = self._open.pop(source, since_ns)
        if since_ns is not None:
            self.add(since_ns, end_ns, BACKLOG)
        if not self._open and self._caught_up is not None:
            self._caught_up.set()

    @property
    def behind(self) -> bool:
        """Whether some source is behind what reached it at this moment."""
        return bool(self._open)

    async def caught_up(self) -> None:
        """Return once no source is behind."""
        if self._caught_up is None:
            self._caught_up = asyncio.Event()
        if self._open:
            self._caught_up.clear()
            await self._caught_up.wait()

    def behind_for_ns(self, now_ns: int) -> int:
        """How long the source longest behind has been so by now (0: none is)."""
        return max((now_ns - since for since in self._open.values()), default=0)

    def falling_behind(self, now_ns: int) -> bool:
        """Whether some source has been behind for longer than the tolerance by now."""
        return self.behind_for_ns(now_ns) >= TOLERANCE_NS

    def earliest_arrival(self, seen_ns: int) -> int | None:
        """When something read at ``seen_ns`` may have arrived at the earliest: the start
        of the span it was read in or at the end of; None when it was read outside every
        span (its stamp is exact)."""
        earliest = min(self._open.values(), default=None)
        if earliest is not None and earliest > seen_ns:
            earliest = None
        beat = self._last_beat_ns
        if beat is not None and seen_ns - beat >= TOLERANCE_NS:
            # Read in the first turn after a stall whose end the heartbeat has not seen yet.
            earliest = beat if earliest is None else min(earliest, beat)
        if self._last_end_ns + _READ_EDGE_NS < seen_ns:
            return earliest  # the common case: nothing closed since long before the read
        for span in reversed(self._closed):
            if span.end_ns + _READ_EDGE_NS < seen_ns:
                break
            if span.start_ns <= seen_ns and (earliest is None or span.start_ns < earliest):
                earliest = span.start_ns
        return earliest

    def may_have_lost(self, start_ns: int, end_ns: int) -> bool:
        """Whether a backlog overlapped ``start_ns`` to ``end_ns``: the platform may have
        dropped something meant for the prober then."""
        if any(since < end_ns for since in self._open.values()):
            return True
        if self._last_end_ns <= start_ns:
            return False
        for span in reversed(self._closed):
            if span.end_ns <= start_ns:
                break
            if span.cause == BACKLOG and span.start_ns < end_ns:
                return True
        return False


class LoopWatch:
    """A heartbeat on the prober's loop: notes every stall as a blind span, and says
    whether the loop is busy (the prober is short of CPU, not waiting for the platform).

    Each beat is due ``interval_s`` after the last: when one comes late, the loop ran
    nothing on time since the previous one, and whatever arrived meanwhile was read late.
    From timestamps, so a loop too busy to look hides nothing.
    """

    BUSY_LATE_NS = 1_000_000
    """A beat this late found the loop at work."""
    BUSY_BEATS = 8
    """The loop is busy when this many of the last ten beats found it at work: a loop
    that is short of CPU runs nearly every timer late; one descheduled once, one beat."""

    def __init__(
        self,
        blind: BlindSpans,
        interval_s: float = HEARTBEAT_S,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._blind = blind
        self._interval_s = interval_s
        self._clock = clock
        self._late_beats: deque[bool] = deque(maxlen=10)
        self._read_until_ns = clock()

    @property
    def busy(self) -> bool:
        """Whether the loop has had no time to spare lately."""
        return sum(self._late_beats) >= self.BUSY_BEATS

    def watermark(self, now_ns: int) -> int:
        """Up to when the loop is known to have read what reached it: the beat before the
        last one, when the last came on time (the loop has turned, and polled every
        socket, since); after a stall, the beat before the stall, until the loop has
        turned on time again."""
        return min(now_ns, self._read_until_ns)

    async def run(self) -> None:
        """Beat until cancelled."""
        interval_ns = round(self._interval_s * 1e9)
        self._read_until_ns = last_ns = self._clock()
        while True:
            await asyncio.sleep(self._interval_s)
            now_ns = self._clock()
            late_ns = now_ns - last_ns - interval_ns
            self._late_beats.append(late_ns >= self.BUSY_LATE_NS)
            if late_ns < interval_ns:
                self._read_until_ns = last_ns
            self._blind.add(last_ns, now_ns, STALL)  # kept only when over the tolerance
            self._blind.beat(now_ns)
            last_ns = now_ns
