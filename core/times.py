"""Wall-clock times as reports and payloads write them.

Durations inside the process are measured on the monotonic clock (``time.monotonic_ns``);
the wall clock is only for what a person or another system reads.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime


def iso_utc(wall_ns: int) -> str:
    """``2026-11-22T10:00:00.123456Z`` for a wall-clock time in nanoseconds."""
    seconds, remainder = divmod(wall_ns, 1_000_000_000)
    return f"{_iso_second(seconds)}.{remainder // 1000:06d}Z"


@functools.lru_cache(maxsize=4)
def _iso_second(seconds: int) -> str:
    # Every signal is stamped twice; formatting the date once per second saves ~3 µs each.
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
