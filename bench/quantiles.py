"""Bounded quantile sketches beside the exact samples the result book keeps now, in one run.

For rolling windows (monitor mode) latencies must live in mergeable structures of bounded
size with a known error. This measures, for 1,000,000 latencies (log-normal around 5 ms,
a tail to seconds): the cost of adding one, of reading p50/p99/p99.9, of merging two
windows, the size, and the error of each quantile against the exact value. Candidates:
DDSketch (PyPI ``ddsketch``, relative error 1%), HdrHistogram (PyPI ``hdrhistogram``,
microseconds, 3 significant digits), and a plain list sorted at read time (exact).

Run: ``python bench/quantiles.py`` (after ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import pickle
import random
import time
from collections.abc import Callable
from typing import Any

from ddsketch import DDSketch
from hdrh.histogram import HdrHistogram

COUNT = 1_000_000
QUANTILES = (0.5, 0.99, 0.999)


def latencies() -> list[float]:
    rng = random.Random(7)
    return [rng.lognormvariate(-5.3, 0.8) for _ in range(COUNT)]


class Exact:
    name = "exact (sorted list)"

    def __init__(self) -> None:
        self.values: list[float] = []

    def add(self, value: float) -> None:
        self.values.append(value)

    def quantiles(self) -> list[float]:
        ordered = sorted(self.values)
        return [ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in QUANTILES]

    def merge(self, other: Exact) -> None:
        self.values.extend(other.values)


class Sketch:
    name = "DDSketch (1%)"

    def __init__(self) -> None:
        self.sketch = DDSketch(relative_accuracy=0.01)

    def add(self, value: float) -> None:
        self.sketch.add(value)

    def quantiles(self) -> list[float]:
        return [float(self.sketch.get_quantile_value(q)) for q in QUANTILES]

    def merge(self, other: Sketch) -> None:
        self.sketch.merge(other.sketch)


class Hdr:
    name = "HdrHistogram (µs, 3 digits)"

    def __init__(self) -> None:
        self.histogram = HdrHistogram(1, 60_000_000, 3)  # 1 µs .. 60 s

    def add(self, value: float) -> None:
        self.histogram.record_value(max(1, int(value * 1e6)))

    def quantiles(self) -> list[float]:
        return [self.histogram.get_value_at_percentile(q * 100) / 1e6 for q in QUANTILES]

    def merge(self, other: Hdr) -> None:
        self.histogram.add(other.histogram)


def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def main() -> None:
    values = latencies()
    exact = sorted(values)
    truth = [exact[min(COUNT - 1, int(q * COUNT))] for q in QUANTILES]
    columns = ["structure", "add, ns", "read 3 quantiles, ms", "merge, ms", "size, KB"]
    print("| " + " | ".join([*columns, "error p50/p99/p99.9"]) + " |")
    print("|---|---:|---:|---:|---:|---|")
    for kind in (Exact, Sketch, Hdr):
        one, two = kind(), kind()
        add_s, _ = timed(lambda: [one.add(value) for value in values])  # noqa: B023
        read_s, found = timed(one.quantiles)
        for value in values[:100_000]:
            two.add(value)
        merge_s, _ = timed(lambda: one.merge(two))  # noqa: B023
        size_kb = len(pickle.dumps(one.histogram.encode() if isinstance(one, Hdr) else one)) / 1024
        errors = " / ".join(f"{abs(f - t) / t:.2%}" for f, t in zip(found, truth, strict=True))
        print(
            f"| {kind.name} | {add_s / COUNT * 1e9:,.0f} | {read_s * 1e3:,.1f} | "
            f"{merge_s * 1e3:,.2f} | {size_kb:,.0f} | {errors} |"
        )


if __name__ == "__main__":
    main()
