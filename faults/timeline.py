"""Apply faults on time and revert them on time, recording when each really happened.

A window knows nothing of what it breaks: it holds an ``apply`` and a ``revert``
coroutine function. The timeline runs them at their offsets from the start of emission,
in one task, records the monotonic and wall-clock times at which each took effect (the
outcomes are judged against those, not against the plan), and on the way out reverts
whatever is still applied, so an interrupted run leaves nothing broken behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fleetprobe.core.errors import FleetprobeError

log = logging.getLogger("fleetprobe.faults")

Action = Callable[[], Awaitable[None]]


@dataclass
class Window:
    """One fault: what it is, when, and what it did."""

    name: str
    kind: str
    target: str
    at_s: float
    for_s: float | None
    apply: Action
    revert: Action | None
    applied_ns: int | None = None
    reverted_ns: int | None = None
    applied_wall_ns: int | None = None
    reverted_wall_ns: int | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        """How long it was in force (so far); 0 before it was applied."""
        if self.applied_ns is None:
            return 0.0
        end = self.reverted_ns if self.reverted_ns is not None else time.monotonic_ns()
        return (end - self.applied_ns) / 1e9

    @property
    def active(self) -> bool:
        """Applied and not yet reverted."""
        return self.applied_ns is not None and self.reverted_ns is None


class Timeline:
    """Runs windows against a start time.

    Args:
        windows: the faults, in any order.
        on_change: called with a window and True when it took effect, False when reverted.
    """

    def __init__(
        self, windows: list[Window], on_change: Callable[[Window, bool], None] | None = None
    ) -> None:
        self.windows = windows
        self._on_change = on_change or (lambda _window, _active: None)

    async def run(self, start_ns: int) -> None:
        """Apply and revert every window at its time from ``start_ns`` (monotonic)."""
        events: list[tuple[float, int, Window, bool]] = []
        for order, window in enumerate(self.windows):
            events.append((window.at_s, order, window, True))
            if window.for_s is not None:
                events.append((window.at_s + window.for_s, order, window, False))
        # At equal times, reverts go first: a fault that ends frees its target for the next.
        events.sort(key=lambda event: (event[0], event[3], event[1]))
        for offset_s, _, window, applying in events:
            delay = start_ns / 1e9 + offset_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if applying:
                await self._apply(window)
            else:
                await self._revert(window)

    async def revert_active(self) -> None:
        """Revert every window that is still applied (at the end, or when interrupted)."""
        for window in self.windows:
            if window.active and window.revert is not None:
                await self._revert(window)

    async def _apply(self, window: Window) -> None:
        instant = window.revert is None
        if instant:
            # A fault with no revert (a reconnect storm) is in force while it happens.
            window.applied_ns, window.applied_wall_ns = time.monotonic_ns(), time.time_ns()
            self._on_change(window, True)
        try:
            await window.apply()
        except (FleetprobeError, OSError, ValueError) as error:
            window.errors.append(f"apply: {error}")
            log.error("fault %s could not be applied: %s", window.name, error)
            if not instant:
                return
        now_ns, now_wall_ns = time.monotonic_ns(), time.time_ns()
        if instant:
            window.reverted_ns, window.reverted_wall_ns = now_ns, now_wall_ns
            log.warning("fault %s: %s took %.3fs", window.name, window.kind, window.duration_s)
            self._on_change(window, False)
            return
        window.applied_ns, window.applied_wall_ns = now_ns, now_wall_ns
        log.warning("fault %s on: %s on %s", window.name, window.kind, window.target)
        self._on_change(window, True)

    async def _revert(self, window: Window) -> None:
        if not window.active or window.revert is None:
            return
        try:
            await window.revert()
        except (FleetprobeError, OSError, ValueError) as error:
            window.errors.append(f"revert: {error}")
            log.error("fault %s could not be reverted: %s", window.name, error)
        window.reverted_ns, window.reverted_wall_ns = time.monotonic_ns(), time.time_ns()
        log.warning("fault %s off", window.name)
        self._on_change(window, False)
