"""Exact statistics over recorded values (no histogram buckets)."""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence

QUANTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99}


class Samples:
    """A growing list of float samples, compact in memory (8 bytes each)."""

    __slots__ = ("_sorted", "_values")

    def __init__(self) -> None:
        self._values = array("d")
        self._sorted: list[float] | None = None

    def add(self, value: float) -> None:
        """Record one value."""
        self._values.append(value)
        self._sorted = None

    def extend(self, other: Samples) -> None:
        """Record every value of ``other`` too."""
        self._values.extend(other._values)
        self._sorted = None

    def __len__(self) -> int:
        return len(self._values)

    def since(self, start: int) -> Sequence[float]:
        """The values recorded from index ``start`` on (a copy)."""
        return self._values[start:]

    def quantile(self, q: float) -> float | None:
        """The nearest-rank quantile: the smallest value with at least ``q`` of all at or below."""
        ordered = self._ordered()
        if not ordered:
            return None
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    def summary(self, ndigits: int = 6) -> dict[str, float | None]:
        """p50, p90, p95, p99 and max, rounded."""
        result = {name: _round(self.quantile(q), ndigits) for name, q in QUANTILES.items()}
        ordered = self._ordered()
        result["max"] = _round(ordered[-1], ndigits) if ordered else None
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
