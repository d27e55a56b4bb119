"""The state of a bounded queue, as every part that holds one reports it.

Nothing in fleetprobe waits in an unbounded queue: each queue has a capacity, exports its
depth, and counts what it turned away (``fleetprobe_queue_*``); the saturation watch says
during the run when one overflowed.
"""

from __future__ import annotations

from typing import NamedTuple


class QueueState(NamedTuple):
    """A bounded queue now: what waits in it, its bound, how many it turned away so far."""

    depth: int
    capacity: int
    overflowed: int = 0
