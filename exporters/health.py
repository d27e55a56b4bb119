"""Live health of every hop: up or down, judged over a sliding time window.

Each judged signal adds one sample to each of its hops; a hop is up while the share of ok
samples in the last ``window_s`` meets the objective. A hop counted as ``skipped`` (it
failed only because an earlier hop of the chain had already failed) adds no sample: the
failure is not its own, and counting it would mark the whole chain down below the hop that
broke. Each change of state is logged, kept for the report, exported as
``fleetprobe_hop_up`` and returned to the caller (who may send it as an alert).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from fleetprobe.core.events import HealthChange, RunEvents
from fleetprobe.core.results import HOP_OK, PENDING, SKIPPED, FollowedSignal, HopResult, Verdict
from fleetprobe.probes.chains import ChainSpec

log = logging.getLogger("fleetprobe.health")

MAX_RECENT_LATENCIES = 10_000
# Results that are no sample at all: a failure owed to an earlier hop, no result yet (an
# aborted signal's unjudged hop), or one the prober could not judge.
_NOT_SAMPLES = frozenset({SKIPPED, PENDING, HopResult.INCONCLUSIVE.value})


@dataclass(frozen=True)
class HealthPolicy:
    """When a hop counts as up.

    Attributes:
        window_s: how far back results count.
        min_success_ratio: the share of ok results in the window a hop needs to be up.
        min_samples: with fewer results in the window, a hop keeps its state (a single
            timeout in a quiet minute says little).
    """

    window_s: float = 30.0
    min_success_ratio: float = 0.95
    min_samples: int = 1

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ValueError(f"window_s must be positive, got {self.window_s}")
        if not 0.0 <= self.min_success_ratio <= 1.0:
            raise ValueError(f"min_success_ratio must be in [0, 1], got {self.min_success_ratio}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {self.min_samples}")


class HopHealth:
    """The results of one hop in a sliding time window, with running counts.

    Results must be recorded in time order (a monotonic clock); expiring the oldest is then
    O(1) amortized per result.

    Args:
        window_s: how far back results count.
        max_latencies: at most this many latencies are kept for quantiles (the oldest go
            first), so a busy hop cannot grow them without bound.
    """

    __slots__ = ("_latencies", "_ok", "_results", "_sorted", "_window_ns", "up")

    def __init__(self, window_s: float, *, max_latencies: int = MAX_RECENT_LATENCIES) -> None:
        self._window_ns = round(window_s * 1e9)
        self._results: deque[tuple[int, bool, float | None]] = deque()
        self._ok = 0
        self._latencies: deque[tuple[int, float]] = deque(maxlen=max_latencies)
        self._sorted: list[float] | None = None
        self.up = True  # assumed up until the window shows otherwise

    def record(self, now_ns: int, ok: bool, latency_s: float | None) -> None:
        """Add one judged result at monotonic ``now_ns``; an ok one may bring its latency."""
        self.expire(now_ns)
        self._results.append((now_ns, ok, latency_s))
        if ok:
            self._ok += 1
            if latency_s is not None:
                self._latencies.append((now_ns, latency_s))
                self._sorted = None

    def expire(self, now_ns: int) -> None:
        """Forget results older than the window (a result exactly one window old goes)."""
        cutoff = now_ns - self._window_ns
        results = self._results
        while results and results[0][0] <= cutoff:
            _, ok, _ = results.popleft()
            if ok:
                self._ok -= 1
        latencies = self._latencies
        if latencies and latencies[0][0] <= cutoff:
            while latencies and latencies[0][0] <= cutoff:
                latencies.popleft()
            self._sorted = None

    @property
    def samples(self) -> int:
        """Results in the window."""
        return len(self._results)

    @property
    def success_ratio(self) -> float | None:
        """The share of ok results in the window; None when it is empty."""
        return self._ok / len(self._results) if self._results else None

    @property
    def latency_count(self) -> int:
        """Latencies kept for quantiles."""
        return len(self._latencies)

    def recent_quantile(self, q: float) -> float | None:
        """The nearest-rank ``q`` quantile of the kept latencies of ok results, or None.

        Sorted on demand and cached until the next change: meant for a live view that reads
        a few quantiles now and then, not for every result.
        """
        if self._sorted is None:
            self._sorted = sorted(latency for _, latency in self._latencies)
        ordered = self._sorted
        if not ordered:
            return None
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class HealthMonitor(RunEvents):
    """The health of every hop of every chain, and its changes.

    A sink of the run's verdicts (or fed by :meth:`record`); call :meth:`evaluate` now and then
    (every second is plenty); it returns what changed since the last call.

    Args:
        chains: the chains that are followed (indexed as in the tracker).
        policy: the window and the objective.
        registry: where ``fleetprobe_hop_up`` lives.
        scenario: the scenario name, a label.
    """

    def __init__(
        self,
        chains: Sequence[ChainSpec],
        policy: HealthPolicy,
        registry: CollectorRegistry,
        scenario: str,
    ) -> None:
        self.chains = tuple(chains)
        self.policy = policy
        self.scenario = scenario
        self._hops = [[HopHealth(policy.window_s) for _ in c.hops] for c in self.chains]
        self._changes: list[HealthChange] = []
        gauge = Gauge(
            "fleetprobe_hop_up",
            "1 while the hop's share of ok results over the health window meets the objective.",
            ["scenario", "chain", "hop"],
            registry=registry,
        )
        self._up_gauges = [
            [gauge.labels(scenario, c.name, h.name) for h in c.hops] for c in self.chains
        ]
        for gauges in self._up_gauges:
            for child in gauges:
                child.set(1)

    def hop(self, chain_index: int, hop_index: int) -> HopHealth:
        """The window of one hop (for a live view: ratio, samples, recent quantiles)."""
        return self._hops[chain_index][hop_index]

    def verdict(self, followed: FollowedSignal) -> None:
        self.record(followed, time.monotonic_ns())

    def record(self, followed: FollowedSignal, now_ns: int) -> None:
        """Add each hop's counted result of a judged signal, at monotonic ``now_ns``.

        An aborted signal adds nothing: the run was interrupted, the platform did not fail.
        """
        if followed.verdict is Verdict.ABORTED:
            return
        hops = self._hops[followed.chain_index]
        for hop_index, health in enumerate(hops):
            counted = followed.counted_result(hop_index)
            if counted in _NOT_SAMPLES:
                continue
            ok = counted in HOP_OK
            exact = ok and followed.latency_known(hop_index)
            health.record(now_ns, ok, followed.latency_s(hop_index) if exact else None)

    def evaluate(self, now_ns: int, wall_ns: int | None = None) -> list[HealthChange]:
        """Judge every hop at monotonic ``now_ns``; return the hops whose state changed.

        Args:
            now_ns: the monotonic time, on the clock ``record`` was given.
            wall_ns: the wall-clock time stamped on the changes (default: now).
        """
        at_wall_ns = time.time_ns() if wall_ns is None else wall_ns
        policy = self.policy
        found: list[HealthChange] = []
        for chain_index, chain in enumerate(self.chains):
            hops = self._hops[chain_index]
            flipped: list[int] = []
            for hop_index, health in enumerate(hops):
                health.expire(now_ns)
                ratio = health.success_ratio
                if ratio is None or health.samples < policy.min_samples:
                    continue  # too little to go on: the hop keeps its state
                up = ratio >= policy.min_success_ratio
                if up != health.up:
                    health.up = up
                    self._up_gauges[chain_index][hop_index].set(1 if up else 0)
                    flipped.append(hop_index)
            if not flipped:
                continue
            # Computed after every hop of the chain is judged, so each change names the root
            # of the cascade as it stands now, whichever hop flipped first in the loop.
            first_down = next((i for i, h in enumerate(hops) if not h.up), None)
            first_failing = None if first_down is None else chain.hops[first_down].name
            for hop_index in flipped:
                health = hops[hop_index]
                change = HealthChange(
                    chain=chain.name,
                    hop=chain.hops[hop_index].name,
                    up=health.up,
                    at_wall_ns=at_wall_ns,
                    success_ratio=health.success_ratio or 0.0,
                    samples=health.samples,
                    first_failing_hop=first_failing,
                    window_s=policy.window_s,
                    objective=policy.min_success_ratio,
                )
                log.log(logging.INFO if change.up else logging.WARNING, "%s", change.describe())
                found.append(change)
        self._changes.extend(found)
        return found

    @property
    def changes(self) -> list[HealthChange]:
        """Every change so far, oldest first (a copy)."""
        return list(self._changes)

    def as_report(self) -> list[dict[str, Any]]:
        """Every change so far as JSON-ready dicts, oldest first."""
        return [change.as_dict() for change in self._changes]
