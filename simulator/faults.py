"""Faults of the fleet itself: what real vehicles do to a platform now and then.

* ``malformed``: a share of the signals goes out with a broken payload;
* ``duplicate``: a share of the signals is sent twice;
* ``offline``: a share of the vehicles loses its connection and keeps its signals, then
  sends them all when it is back (late, and out of order with the rest of the fleet);
* ``clock_skew``: a share of the vehicles stamps ``sent_at`` with a clock that is off;
* ``reconnect_storm``: every session drops and reconnects at once (spread by ``jitter``).

:class:`FleetFaults` holds the faults in force; the emitter asks it about each signal.
Which vehicles a share picks depends only on the fault's name and the VIN, so a run
repeats with the same seed, and a vehicle picked in a shard is picked in the whole fleet.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from fleetprobe.simulator.fleet import Emission


def _picked(fault: str, vin: str, share: float) -> bool:
    digest = hashlib.blake2b(f"{fault}/{vin}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * 2**64


@dataclass
class _Active:
    kind: str
    attributes: dict[str, Any]


@dataclass
class Held:
    """A signal an offline vehicle keeps until it is back."""

    emission: Emission
    intended_ns: int


@dataclass
class FleetFaults:
    """The fleet's faults in force, and the signals offline vehicles hold."""

    seed: int = 0
    _active: dict[str, _Active] = field(default_factory=dict)
    _held: dict[str, list[Held]] = field(default_factory=lambda: defaultdict(list))
    affected: dict[str, int] = field(default_factory=dict)
    """Signals (or sessions, for a reconnect storm) each fault changed, by fault name."""

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def start(self, name: str, kind: str, attributes: dict[str, Any]) -> None:
        """Put a fault in force."""
        self._active[name] = _Active(kind, dict(attributes))
        self.affected.setdefault(name, 0)

    def stop(self, name: str) -> list[Held]:
        """End a fault; for ``offline``, return what its vehicles held, in send order."""
        active = self._active.pop(name, None)
        if active is None or active.kind != "offline":
            return []
        released = self._held.pop(name, [])
        released.sort(key=lambda held: held.intended_ns)
        return released

    @property
    def any_active(self) -> bool:
        """Whether any fault is in force (the emitter's fast path when not)."""
        return bool(self._active)

    def hold(self, emission: Emission, intended_ns: int) -> bool:
        """Keep the signal if its vehicle is offline; True when it was kept."""
        for name, active in self._active.items():
            if active.kind == "offline" and _picked(name, emission.vin, active.attributes["share"]):
                self._held[name].append(Held(emission, intended_ns))
                self._count(name)
                return True
        return False

    def malformed(self) -> str | None:
        """The fault that breaks the next signal's payload, if any."""
        return self._by_ratio("malformed")

    def duplicated(self) -> str | None:
        """The fault that sends the next signal twice, if any."""
        return self._by_ratio("duplicate")

    def skew_ns(self, vin: str) -> int:
        """How far off this vehicle's clock is now, in nanoseconds."""
        for name, active in self._active.items():
            if active.kind == "clock_skew" and _picked(name, vin, active.attributes["share"]):
                self._count(name)
                return round(float(active.attributes["skew"]) * 1e9)
        return 0

    def count(self, name: str, number: int = 1) -> None:
        """Count what a fault changed outside this class (sessions of a storm)."""
        self._count(name, number)

    def _by_ratio(self, kind: str) -> str | None:
        for name, active in self._active.items():
            if active.kind == kind and self._rng.random() < active.attributes["ratio"]:
                self._count(name)
                return name
        return None

    def _count(self, name: str, number: int = 1) -> None:
        self.affected[name] = self.affected.get(name, 0) + number


def malform(payload: bytes) -> bytes:
    """A payload cut short, as a device that lost power mid-write would send it."""
    return payload[: max(1, len(payload) // 2)] + b"\x00\xff"
