"""Saying, while a run lasts, when the prober itself is the limit.

A probe that cannot keep its schedule reports its own overload as platform latency, and
one that drops what it received reports it as platform loss. The
:class:`SaturationWatch` files each sent signal's emission lag under the second of the
run it was due in (from timestamps, so a loop too busy to look every second hides
nothing), and looks at the observers' bounded queues and at the prober's blind spans
(:mod:`fleetprobe.core.blind_spans`); a second whose emission lag p99 is over the limit,
in which a queue overflowed, or that a blind span touched, is saturated. It logs which
limit was hit, sets ``fleetprobe_prober_saturated``, and the report counts every
saturated second.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from fleetprobe.core.blind_spans import BACKLOG, STALL, BlindSpan
from fleetprobe.core.events import RunEvents
from fleetprobe.core.queues import QueueState
from fleetprobe.exporters.stats import format_ms

LAG_LIMIT_S = 0.010
"""Emission lag p99 above which the prober no longer keeps the fleet's schedule."""
REPEAT_EVERY_S = 10.0
"""While saturation lasts, the warning is repeated this often (not every second)."""
KEEP_SECONDS = 60
"""How long a second's counts are kept for signals due then but sent later (a held-up
loop sends them late); older seconds are judged for good."""
CLEAN_WINDOWS_TO_RECOVER = 3
"""Saturation ends after this many windows in a row within the limits: a prober at its
limit passes and fails alternate seconds, and one line per flip would only be noise."""

log = logging.getLogger("fleetprobe")

Queues = Callable[[], Mapping[str, QueueState]]
"""Every bounded queue of the run, by name."""

PROBER_QUEUES = {
    "mqtt_observer": "received messages dropped: timeouts at its hops include the prober's "
    "own loss",
    "tracker": "signals not sent (send errors tracker_full): more were in flight than the "
    "prober follows at once",
    "qos_acks": "the fleet waited for room to send (it shows as emission lag)",
}
"""The queues whose overflow means the prober itself is the limit, and what an overflow
cost. Other queues overflow for other reasons (``reconnect_wait``: the broker is away;
``alerts``: the receivers are slow); their overflows are counted all the same."""


class SaturationWatch(RunEvents):
    """Judges each window of the run against the prober's own limits; a sink of the run's
    events (the emission lag of each signal sent).

    Args:
        queues: the run's bounded queues.
        registry: where the saturation metrics live.
        scenario: the scenario label.
        clock: the monotonic clock in ns (the run's; a test's own).
    """

    def __init__(
        self,
        queues: Queues,
        registry: CollectorRegistry,
        scenario: str,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._clock = clock
        self._start_ns: int | None = None
        self._recent_lags: list[float] = []  # since the last check: for the message
        self._seconds: dict[int, list[int]] = {}  # second due -> [signals, over the limit]
        self._saturated_seconds: set[int] = set()
        self._lagging_seconds: set[int] = set()  # those over the emission lag limit
        self._queues = queues
        self._overflowed: dict[str, int] = {}
        self._saturated_since_s: float | None = None
        self._clean_windows = 0
        self._last_warning_s = -math.inf
        self.worst_lag_p99_s: float | None = None
        self.limits_hit: set[str] = set()
        self._new_spans: list[BlindSpan] = []  # since the last check
        self._blind = {cause: {"spans": 0, "seconds": 0.0} for cause in (STALL, BACKLOG)}
        self._scenario = scenario
        self._gauge = Gauge(
            "fleetprobe_prober_saturated",
            "1 while the prober itself is the limit (emission lag p99 over 10 ms in the last "
            "second, or one of its queues overflowed), else 0.",
            ["scenario"],
            registry=registry,
        ).labels(scenario)

    def begin(self, start_ns: int) -> None:
        """Emission starts at monotonic ``start_ns``: second 0 of the run."""
        self._start_ns = start_ns

    def signal_sent(self, signal: str, lag_s: float | None) -> None:
        if lag_s is None or self._start_ns is None:
            return
        self._recent_lags.append(lag_s)
        due_s = (self._clock() - self._start_ns) / 1e9 - lag_s
        counts = self._seconds.get(int(due_s))
        if counts is None:
            counts = self._seconds[int(due_s)] = [0, 0]
        counts[0] += 1
        if lag_s > LAG_LIMIT_S:
            counts[1] += 1

    def blind_span(self, span: BlindSpan) -> None:
        """The prober was blind during ``span``: every second it touched is saturated."""
        self._new_spans.append(span)
        totals = self._blind[span.cause]
        totals["spans"] += 1
        totals["seconds"] = round(totals["seconds"] + (span.end_ns - span.start_ns) / 1e9, 3)
        self.limits_hit.add("loop_stall" if span.cause == STALL else "receive_backlog")
        if self._start_ns is not None:
            first, last = ((t - self._start_ns) // 1_000_000_000 for t in span[:2])
            self._saturated_seconds.update(range(max(0, first), max(0, last) + 1))

    @property
    def windows_saturated(self) -> int:
        """Seconds of the run in which the prober was the limit."""
        return len(self._saturated_seconds)

    def check(self, now_s: float, window_s: float) -> None:
        """Judge what happened since the last check (``now_s`` since emission began; the
        last check was about ``window_s`` ago, or longer when the loop was held up)."""
        problems = [
            *self._lag_problem(now_s),
            *self._queue_problems(now_s, window_s),
            *self._blind_problem(),
        ]
        self._gauge.set(1 if problems else 0)
        if problems:
            self._clean_windows = 0
            if self._saturated_since_s is None:
                self._saturated_since_s = now_s - window_s
            if now_s - self._last_warning_s >= REPEAT_EVERY_S:
                self._last_warning_s = now_s
                log.warning(
                    "the prober is saturated: %s; what it measures now includes its own "
                    "delay or loss (send fewer signals, sample the chains, or run shards)",
                    "; ".join(problems),
                )
        elif self._saturated_since_s is not None:
            self._clean_windows += 1
            if self._clean_windows >= CLEAN_WINDOWS_TO_RECOVER:
                log.info(
                    "the prober keeps up again (saturated from %.0fs to %.0fs of the run)",
                    self._saturated_since_s,
                    now_s - self._clean_windows * window_s,
                )
                self._saturated_since_s = None
                self._last_warning_s = -math.inf

    def _lag_problem(self, now_s: float) -> list[str]:
        lags, self._recent_lags = self._recent_lags, []
        # A second is saturated once more than 1% of the signals due in it were sent more
        # than the limit late (its emission lag p99 is over the limit), however late the
        # check: every such second counts.
        newly = sorted(
            second
            for second, (signals, late) in self._seconds.items()
            if late * 100 > signals and second not in self._lagging_seconds
        )
        for second in [s for s in self._seconds if s < now_s - KEEP_SECONDS]:
            del self._seconds[second]
        if not newly:
            return []
        self._lagging_seconds.update(newly)
        self._saturated_seconds.update(newly)
        ordered = sorted(lags)
        p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)] if ordered else 0.0
        if self.worst_lag_p99_s is None or p99 > self.worst_lag_p99_s:
            self.worst_lag_p99_s = p99
        self.limits_hit.add("emission_lag")
        span = f"second {newly[0]}" if len(newly) == 1 else f"{len(newly)} seconds"
        return [
            f"emission lag p99 {format_ms(p99)} in {span} of the run "
            f"(limit {format_ms(LAG_LIMIT_S)})"
        ]

    def _blind_problem(self) -> list[str]:
        spans, self._new_spans = self._new_spans, []
        if not spans:
            return []
        stalls = [s for s in spans if s.cause == STALL]
        longest_s = max(s.end_ns - s.start_ns for s in spans) / 1e9
        return [
            f"it was blind {len(spans)} times (loop stalled {len(stalls)}, fell behind its "
            f"reads {len(spans) - len(stalls)}; longest {format_ms(longest_s)}): what "
            "it could not see then is inconclusive, not failed"
        ]

    def _queue_problems(self, now_s: float, window_s: float) -> list[str]:
        problems = []
        for name, state in self._queues().items():
            if name not in PROBER_QUEUES:
                continue
            new = state.overflowed - self._overflowed.get(name, 0)
            if new > 0:
                self._overflowed[name] = state.overflowed
                self._saturated_seconds.add(max(0, math.ceil(now_s) - 1))
                self.limits_hit.add(f"{name}_queue")
                problems.append(
                    f"the {name} queue (capacity {state.capacity:,}) overflowed {new:,} times "
                    f"in the last {window_s:g}s: {PROBER_QUEUES[name]}"
                )
        return problems

    def as_report(self) -> dict[str, Any]:
        """What report.json keeps: whether and how the prober was the limit."""
        return {
            "saturated": bool(self.limits_hit),
            "limits_hit": sorted(self.limits_hit),
            "windows_saturated": self.windows_saturated,
            "worst_lag_p99_s": self.worst_lag_p99_s,
            "queue_overflowed": dict(self._overflowed),
            "blind": self._blind,
        }

    def summary_lines(self) -> list[str]:
        """Warnings for the end-of-run summary; none when the prober kept up."""
        return summary_lines(self.as_report())


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """The end-of-run warnings of a ``prober`` report: one per queue that overflowed."""
    return [
        f"  WARNING: the {name} queue overflowed {count:,} times: {PROBER_QUEUES[name]}"
        for name, count in sorted(report["queue_overflowed"].items())
    ]


def merge_reports(reports: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``prober`` report of several shard processes: saturated if any one was."""
    limits = sorted({limit for r in reports for limit in r["limits_hit"]})
    lags = [r["worst_lag_p99_s"] for r in reports if r["worst_lag_p99_s"] is not None]
    overflowed: dict[str, int] = {}
    blind = {cause: {"spans": 0, "seconds": 0.0} for cause in (STALL, BACKLOG)}
    for r in reports:
        for name, count in r["queue_overflowed"].items():
            overflowed[name] = overflowed.get(name, 0) + count
        for cause, totals in r["blind"].items():
            blind[cause]["spans"] += totals["spans"]
            blind[cause]["seconds"] = round(blind[cause]["seconds"] + totals["seconds"], 3)
    return {
        "saturated": bool(limits),
        "limits_hit": limits,
        "windows_saturated": max((r["windows_saturated"] for r in reports), default=0),
        "worst_lag_p99_s": max(lags, default=None),
        "queue_overflowed": overflowed,
        "blind": blind,
    }
