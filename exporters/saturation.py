"""Saying, while a run lasts, when the prober itself is the limit.

A probe that cannot keep its schedule reports its own overload as platform latency, and
one that drops what it received reports it as platform loss. Once a second the
:class:`SaturationWatch` looks at the signals sent in that second and at the observers'
bounded queues; when the emission lag p99 of the window is over the limit, or a queue
overflowed, it logs which limit was hit and sets ``fleetprobe_prober_saturated``; the
report keeps the record.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from fleetprobe.core.events import RunEvents
from fleetprobe.core.queues import QueueState
from fleetprobe.exporters.stats import format_ms

LAG_LIMIT_S = 0.010
"""Emission lag p99 above which the prober no longer keeps the fleet's schedule."""
REPEAT_EVERY_S = 10.0
"""While saturation lasts, the warning is repeated this often (not every second)."""
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
    """

    def __init__(self, queues: Queues, registry: CollectorRegistry, scenario: str) -> None:
        self._recent_lags: list[float] = []  # since the last check: one window
        self._queues = queues
        self._overflowed: dict[str, int] = {}
        self._saturated_since_s: float | None = None
        self._clean_windows = 0
        self._last_warning_s = -math.inf
        self.windows_saturated = 0
        self.worst_lag_p99_s: float | None = None
        self.limits_hit: set[str] = set()
        self._scenario = scenario
        self._gauge = Gauge(
            "fleetprobe_prober_saturated",
            "1 while the prober itself is the limit (emission lag p99 over 10 ms in the last "
            "second, or one of its queues overflowed), else 0.",
            ["scenario"],
            registry=registry,
        ).labels(scenario)

    def signal_sent(self, signal: str, lag_s: float | None) -> None:
        if lag_s is not None:
            self._recent_lags.append(lag_s)

    def check(self, now_s: float, window_s: float) -> None:
        """Judge the window that ends now (``now_s`` since emission began)."""
        problems = [*self._lag_problem(window_s), *self._queue_problems(window_s)]
        self._gauge.set(1 if problems else 0)
        if problems:
            self._clean_windows = 0
            self.windows_saturated += 1
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

    def _lag_problem(self, window_s: float) -> list[str]:
        lags, self._recent_lags = self._recent_lags, []
        late = sum(1 for lag in lags if lag > LAG_LIMIT_S)
        if not lags or late * 100 <= len(lags):  # p99 within the limit
            return []
        ordered = sorted(lags)
        p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
        if self.worst_lag_p99_s is None or p99 > self.worst_lag_p99_s:
            self.worst_lag_p99_s = p99
        self.limits_hit.add("emission_lag")
        return [
            f"emission lag p99 {format_ms(p99)} over the last {window_s:g}s "
            f"(limit {format_ms(LAG_LIMIT_S)}) at {len(lags) / window_s:,.0f} signals/s"
        ]

    def _queue_problems(self, window_s: float) -> list[str]:
        problems = []
        for name, state in self._queues().items():
            if name not in PROBER_QUEUES:
                continue
            new = state.overflowed - self._overflowed.get(name, 0)
            if new > 0:
                self._overflowed[name] = state.overflowed
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
    for r in reports:
        for name, count in r["queue_overflowed"].items():
            overflowed[name] = overflowed.get(name, 0) + count
    return {
        "saturated": bool(limits),
        "limits_hit": limits,
        "windows_saturated": max((r["windows_saturated"] for r in reports), default=0),
        "worst_lag_p99_s": max(lags, default=None),
        "queue_overflowed": overflowed,
    }
