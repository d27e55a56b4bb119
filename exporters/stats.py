"""Statistics over recorded values (no histogram buckets): exact, or from a bounded
uniform sample on long runs."""

from __future__ import annotations

import bisect
import math
import random
from array import array
from collections.abc import Sequence

QUANTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99}


EXACT_LIMIT = 1_000_000
"""Values a Samples keeps (8 MB); past it, a uniform sample of that many of all values."""


class Samples:
    """The values recorded in a run, compact (8 bytes each) and bounded.

    Up to ``limit`` values all are kept and quantiles are exact. Past it, the kept values
    are a uniform random sample of everything recorded (reservoir sampling), so memory
    stays bounded on long runs while quantiles stay close: with a million kept, a p99 is
    off by about 0.01% of rank. The count and the maximum stay exact.
    """

    __slots__ = ("_count", "_limit", "_max", "_rng", "_sorted", "_values")

    def __init__(self, limit: int = EXACT_LIMIT) -> None:
        self._values = array("d")
        self._sorted: list[float] | None = None
        self._limit = limit
        self._count = 0
        self._max: float | None = None
        self._rng = random.Random(0)  # the same run keeps the same sample

    def add(self, value: float) -> None:
        """Record one value."""
        self._count += 1
        if self._max is None or value > self._max:
            self._max = value
        if len(self._values) < self._limit:
            self._values.append(value)
        else:
            slot = self._rng.randrange(self._count)
            if slot >= self._limit:
                return
            self._values[slot] = value
        self._sorted = None

    def extend(self, other: Samples) -> None:
        """Record every value of ``other`` too (both uniform samples: the merge is one)."""
        total = self._count + other._count
        if len(self._values) + len(other._values) <= self._limit and total == len(
            self._values
        ) + len(other._values):
            self._values.extend(other._values)
        else:
            keep = [
                self._rng.sample(list(part._values), min(len(part._values), share))
                for part, share in (
                    (self, round(self._limit * self._count / total)),
                    (other, round(self._limit * other._count / total)),
                )
            ]
            self._values = array("d", keep[0] + keep[1])
        self._count = total
        if other._max is not None and (self._max is None or other._max > self._max):
            self._max = other._max
        self._sorted = None

    @property
    def exact(self) -> bool:
        """Whether every value recorded is kept (quantiles are exact)."""
        return self._count == len(self._values)

    def __len__(self) -> int:
        return self._count

    def quantile(self, q: float) -> float | None:
        """The nearest-rank quantile: the smallest value with at least ``q`` of all at or below."""
        ordered = self._ordered()
        if not ordered:
            return None
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    def quantile_with(self, q: float, count: int, value: float) -> float | None:
        """The quantile had ``count`` more values of ``value`` been recorded (bounds of a
        quantile when ``count`` values are unknown: at their least and their most)."""
        ordered = self._ordered()
        if ordered and not self.exact:  # a sample: the extra values in the sample's scale
            count = round(count * len(ordered) / self._count)
        total = len(ordered) + count
        if not total:
            return None
        rank = max(0, math.ceil(q * total) - 1)
        below = bisect.bisect_left(ordered, value)
        if rank < below:
            return ordered[rank]
        return value if rank < below + count else ordered[rank - count]

    def summary(self, ndigits: int = 6) -> dict[str, float | None]:
        """p50, p90, p95, p99 and max, rounded."""
        result = {name: _round(self.quantile(q), ndigits) for name, q in QUANTILES.items()}
        result["max"] = _round(self._max, ndigits)
        return result

    def _ordered(self) -> Sequence[float]:
        if self._sorted is None:
            self._sorted = sorted(self._values)
        return self._sorted


def _round(value: float | None, ndigits: int) -> float | None:
    return None if value is None else round(value, ndigits)


def format_ms(seconds: float | None) -> str:
    """``12.3ms`` (``12.3s`` from ten seconds on); ``-`` for no value."""
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f}ms" if seconds < 10 else f"{seconds:.1f}s"
