"""The live view of a run: a table redrawn in place on a terminal, plain log lines elsewhere.

On a terminal, log records are shown inside the view (the last few, under the table)
instead of being written over it. Where the output is not a terminal (CI), the view logs
one progress line every ``PLAIN_EVERY_S`` instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from fleetprobe.core.results import HOP_FAILED, HOP_OK
from fleetprobe.exporters.health import HealthMonitor
from fleetprobe.exporters.results import ResultBook
from fleetprobe.exporters.stats import format_ms

log = logging.getLogger("fleetprobe")

REDRAW_EVERY_S = 1.0
PLAIN_EVERY_S = 10.0
EVENT_LINES = 6


class LiveView:
    """Shows per chain and hop: ok/failed counts, recent p50/p99, health; and progress.

    Args:
        out: where the view is drawn.
        book: the run's results so far.
        health: the hops' sliding windows (recent latency quantiles and up/down).
        duration_s: the emission phase, for the progress bar.
        interactive: redraw in place (a terminal) or log plain lines.
    """

    def __init__(
        self,
        out: TextIO,
        book: ResultBook,
        health: HealthMonitor,
        *,
        scenario: str,
        duration_s: float,
        interactive: bool,
    ) -> None:
        self.out = out
        self.book = book
        self.health = health
        self.scenario = scenario
        self.duration_s = duration_s
        self.interactive = interactive
        self.phase = "starting"
        self.inflight: Callable[[], int] = lambda: 0
        self._started = time.monotonic()
        self._drawn_lines = 0
        self._events: deque[str] = deque(maxlen=EVENT_LINES)

    async def run(self) -> None:
        """Draw until cancelled; the last frame stays on screen."""
        self._started = time.monotonic()
        with self._capturing_logs():
            try:
                while True:
                    if self.interactive:
                        self.draw()
                        await asyncio.sleep(REDRAW_EVERY_S)
                    else:
                        await asyncio.sleep(PLAIN_EVERY_S)
                        log.info("%s", self.progress_line())
            finally:
                if self.interactive:
                    self.draw()

    def draw(self) -> None:
        """Replace the previous frame with the current one."""
        frame = self.frame()
        erase = f"\x1b[{self._drawn_lines}F\x1b[J" if self._drawn_lines else ""
        self.out.write(erase + frame + "\n")
        self.out.flush()
        self._drawn_lines = frame.count("\n") + 1

    def progress_line(self) -> str:
        """One line: elapsed time, phase, sent, in flight, per chain ok/failed."""
        sent = sum(s.sent for s in self.book.signals.values())
        chains = ", ".join(
            f"{c.spec.name}: ok {c.verdicts['ok']} failed {c.verdicts['failed']}"
            for c in self.book.chains
        )
        elapsed = time.monotonic() - self._started
        return f"{elapsed:.0f}s {self.phase}: sent {sent}, in flight {self.inflight()}; {chains}"

    def frame(self) -> str:
        """The whole view as text."""
        elapsed = min(time.monotonic() - self._started, self.duration_s)
        done = int(20 * elapsed / self.duration_s) if self.duration_s else 20
        sent = sum(s.sent for s in self.book.signals.values())
        lines = [
            f"fleetprobe {self.scenario}  [{'#' * done}{'-' * (20 - done)}] "
            f"{elapsed:.0f}s/{self.duration_s:g}s  {self.phase}  sent {sent}  "
            f"in flight {self.inflight()}"
        ]
        for c, chain in enumerate(self.book.chains):
            lines.append(
                f"  {chain.spec.name}: ok {chain.verdicts['ok']}, failed {chain.verdicts['failed']}"
            )
            lines.append(
                f"    {'hop':<16}{'ok':>8}{'failed':>8}{'window':>9}{'p50':>10}{'p99':>10}  health"
            )
            for h, (spec, hop) in enumerate(zip(chain.spec.hops, chain.hops, strict=True)):
                window = self.health.hop(c, h)
                ratio = window.success_ratio
                ok = sum(hop.results[r] for r in HOP_OK)
                failed = sum(hop.results[r] for r in HOP_FAILED)
                lines.append(
                    f"    {spec.name:<16}{ok:>8}{failed:>8}"
                    f"{'-' if ratio is None else f'{ratio:.1%}':>9}"
                    f"{format_ms(window.recent_quantile(0.5)):>10}{format_ms(window.recent_quantile(0.99)):>10}"
                    f"  {'up' if window.up else 'DOWN'}"
                )
        if self._events:
            lines.append("  recent events:")
            lines.extend(f"    {event}" for event in self._events)
        return "\n".join(lines)

    @contextmanager
    def _capturing_logs(self) -> Iterator[None]:
        """On a terminal, show log records in the view rather than over it."""
        if not self.interactive:
            yield
            return
        root = logging.getLogger()
        saved = root.handlers[:]
        handler = _EventHandler(self._events)
        root.handlers = [handler]
        try:
            yield
        finally:
            root.handlers = saved


class _EventHandler(logging.Handler):
    def __init__(self, events: deque[str]) -> None:
        super().__init__()
        self.events = events
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(self.format(record))
