"""Draw a run's fault windows on a time axis, for the terminal summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

WIDTH = 40


def render_fault_timeline(faults: Sequence[dict[str, Any]], duration_s: float) -> str:
    """One line per fault: a bar over the run's emission time, then what and when.

    ``faults`` are report entries (``name``, ``kind``, ``target``, ``at_s``, ``for_s``, and
    ``applied_s``/``reverted_s`` when it happened). The bar shows when the fault was in
    force as it happened; a fault that never took effect shows its plan, dotted.
    """
    span = max(duration_s, 1e-9)
    name_width = max((len(f["name"]) for f in faults), default=0)
    lines = [f"  faults {'':{name_width}} 0s{'':{WIDTH - 2}}{duration_s:g}s"]
    for fault in faults:
        happened = fault.get("applied_s") is not None
        if happened:
            start: float = fault["applied_s"]
            end: float = fault.get("reverted_s", start)
        else:
            start, end = fault["at_s"], fault["at_s"] + (fault["for_s"] or 0)
        first = min(WIDTH - 1, int(start / span * WIDTH))
        last = max(first, min(WIDTH - 1, int(end / span * WIDTH - 1e-9)))
        mark = "█" if happened else "░"
        bar = "·" * first + mark * (last - first + 1) + "·" * (WIDTH - last - 1)
        when = f"{start:.1f}s" if end == start else f"{start:.1f}s → {end:.1f}s"
        state = "" if happened else "  (never took effect)"
        lines.append(
            f"    {fault['name']:<{name_width}}  |{bar}|  {fault['kind']} on {fault['target']}"
            f"  {when}{state}"
        )
    return "\n".join(lines)
