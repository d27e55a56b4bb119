"""Fault knobs of the testbed's stages: delay ± jitter, a drop ratio and a stall.

Every stage (see :data:`STAGES`) holds one :class:`StageKnobs`. The control endpoint
changes them in place while the testbed runs, so a stage reads its knobs for every
message rather than copying them. A knob update arrives as JSON, e.g.
``{"delay": "100ms", "jitter": 0.02, "drop": 0.2, "stall": "5s"}``, and is checked whole
by :func:`parse_knob_update` before any of it is applied.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field
from typing import Any, Final

from fleetprobe.core.durations import parse_duration

STAGES: Final = ("gateway", "processor", "api", "webhooks")
"""The testbed's stages, in the order a signal passes them."""

KNOB_KEYS: Final = ("delay", "jitter", "drop", "stall")
"""The keys a knob update may carry."""


@dataclass(frozen=True, slots=True)
class KnobUpdate:
    """A checked knob update; a None field leaves that knob as it is.

    Attributes:
        delay_s: the new delay in seconds.
        jitter_s: the new jitter (±) in seconds.
        drop_ratio: the new share of messages to drop, 0 to 1.
        stall_s: stall for this long from now; 0 ends a stall.
    """

    delay_s: float | None = None
    jitter_s: float | None = None
    drop_ratio: float | None = None
    stall_s: float | None = None


@dataclass(eq=False)
class StageKnobs:
    """The faults one stage adds: delay ± jitter, a drop ratio, and a stall.

    Mutable on purpose: the control endpoint and tests change a running stage's knobs.
    The stall needs a running event loop (:meth:`stall_for` schedules its end on it).

    Args:
        delay_s: added delay in seconds.
        jitter_s: the delay varies uniformly by ± this many seconds (never below 0).
        drop_ratio: share of messages dropped, 0 to 1.
        seed: seeds the random draws of :meth:`delay` and :meth:`drops`.
    """

    delay_s: float = 0.0
    jitter_s: float = 0.0
    drop_ratio: float = 0.0
    seed: InitVar[int | None] = None
    _rng: random.Random = field(init=False, repr=False)
    # Set while the stage runs; cleared during a stall. Waiters block on it, so ending a
    # stall (by its timer or by stall_for(0)) wakes them at once, with no polling.
    _running: asyncio.Event = field(init=False, repr=False)
    _stall_end: asyncio.TimerHandle | None = field(init=False, repr=False, default=None)
    _loop: asyncio.AbstractEventLoop | None = field(init=False, repr=False, default=None)

    def __post_init__(self, seed: int | None) -> None:
        self._rng = random.Random(seed)
        self._running = asyncio.Event()
        self._running.set()

    def delay(self) -> float:
        """A delay to add, in seconds: ``delay_s`` ± a uniform draw of ``jitter_s``, ≥ 0."""
        if not self.jitter_s:
            return max(0.0, self.delay_s)
        return max(0.0, self.delay_s + self._rng.uniform(-self.jitter_s, self.jitter_s))

    def drops(self) -> bool:
        """Whether to drop the current message (true for a ``drop_ratio`` share of calls)."""
        return self.drop_ratio > 0 and self._rng.random() < self.drop_ratio

    @property
    def stalled(self) -> bool:
        """Whether the stage is stalled now."""
        return not self._running.is_set()

    @property
    def stall_remaining_s(self) -> float:
        """Seconds until the current stall ends; 0 when not stalled."""
        if self._stall_end is None or self._loop is None or not self.stalled:
            return 0.0
        return max(0.0, self._stall_end.when() - self._loop.time())

    def stall_for(self, seconds: float) -> None:
        """Stall the stage for ``seconds`` from now (replacing any stall); 0 ends a stall.

        Raises:
            ValueError: ``seconds`` is negative or not finite.
            RuntimeError: no event loop is running.
        """
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"stall: must be a finite number of seconds ≥ 0, got {seconds}")
        if self._stall_end is not None:
            self._stall_end.cancel()
            self._stall_end = None
        if seconds == 0:
            self._running.set()
            return
        self._loop = asyncio.get_running_loop()
        self._running.clear()
        self._stall_end = self._loop.call_later(seconds, self._end_stall)

    async def wait_unstalled(self) -> None:
        """Return at once when not stalled, otherwise when the stall ends."""
        await self._running.wait()

    def apply(self, update: KnobUpdate) -> None:
        """Set the knobs ``update`` names; a stall in it needs a running event loop."""
        if update.delay_s is not None:
            self.delay_s = update.delay_s
        if update.jitter_s is not None:
            self.jitter_s = update.jitter_s
        if update.drop_ratio is not None:
            self.drop_ratio = update.drop_ratio
        if update.stall_s is not None:
            self.stall_for(update.stall_s)

    def as_dict(self) -> dict[str, float]:
        """The knobs in the control endpoint's form (seconds and a ratio).

        Posting this back as an update restores the same knobs, the stall included.
        """
        return {
            "delay": self.delay_s,
            "jitter": self.jitter_s,
            "drop": self.drop_ratio,
            "stall": round(self.stall_remaining_s, 3),
        }

    def _end_stall(self) -> None:
        self._stall_end = None
        self._running.set()


def stage_seed(seed: int | None, stage: str) -> int | None:
    """The seed of one stage's knobs, derived from a testbed-wide seed (None stays None)."""
    return None if seed is None else seed * len(STAGES) + STAGES.index(stage)


def parse_knob_update(data: Any) -> KnobUpdate:
    """Check a decoded JSON knob update, like ``{"delay": "100ms", "drop": 0.2}``.

    Durations (``delay``, ``jitter``, ``stall``) are strings like ``250ms`` or numbers of
    seconds; ``drop`` is a number from 0 to 1.

    Raises:
        ValueError: not an object, an unknown key, or a bad value; the message names the key.
    """
    if not isinstance(data, Mapping):
        raise ValueError(
            'a knob update is a JSON object, like {"delay": "100ms", "drop": 0.1}, '
            f"not {type(data).__name__}"
        )
    for key in data:
        if key not in KNOB_KEYS:
            raise ValueError(f"unknown knob {key!r}: expected one of {', '.join(KNOB_KEYS)}")
    return KnobUpdate(
        delay_s=_duration(data, "delay"),
        jitter_s=_duration(data, "jitter"),
        drop_ratio=_ratio(data, "drop"),
        stall_s=_duration(data, "stall"),
    )


def _duration(data: Mapping[str, Any], key: str) -> float | None:
    if key not in data:
        return None
    value = data[key]
    if isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as error:
            raise ValueError(f"{key}: {error}") from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(
            f"{key}: expected a duration like '100ms' or a number of seconds, got {value!r}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{key}: must be a finite duration ≥ 0, got {value!r}")
    return seconds


def _ratio(data: Mapping[str, Any], key: str) -> float | None:
    if key not in data:
        return None
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}: expected a number from 0 to 1, got {value!r}")
    if not 0 <= value <= 1:  # NaN fails this too
        raise ValueError(f"{key}: must be from 0 to 1, got {value!r}")
    return float(value)
