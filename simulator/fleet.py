"""The fleet model: SimPy processes that move vehicles and schedule their signals.

Everything here runs on simulated time and is exact for a seed: the same seed gives the
same VINs, routes, signal times, payload values and trace ids. Each vehicle draws from
random streams of its own, keyed by seed and VIN, so a vehicle behaves the same whether
it runs in the whole fleet or in a shard of it. Processes only yield SimPy events; what
they emit is appended to an outbox that the :class:`~simulator.clock.FleetClock` drains.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import simpy

from fleetprobe.simulator.geo import bearing_deg, distance_km, random_point
from fleetprobe.simulator.vin import make_vin

Powertrain = Literal["electric", "combustion"]

# Fields a signal offers to templates. ``sent_at`` and ``sent_at_ms`` are filled at send.
SIGNAL_FIELDS = frozenset(
    {
        "vin",
        "trace_id",
        "traceparent",
        "signal",
        "seq",
        "profile",
        "intended_at",
        "sent_at",
        "sent_at_ms",
        "lat",
        "lon",
        "heading_deg",
        "speed_kmh",
        "odometer_km",
        "battery_pct",
        "fuel_pct",
        "charging",
        "ignition",
        "door",
        "locked",
        "moving",
    }
)
# Fields a topic may use: those that stay the same for every signal of a vehicle.
TOPIC_FIELDS = frozenset({"vin", "signal", "profile"})

_LOW_ENERGY_PCT = 20.0
_FULL_ENERGY_PCT = 90.0
_USE_PCT_PER_KM = {"electric": 0.24, "combustion": 0.13}
_REFILL_PCT_PER_S = {"electric": 0.07, "combustion": 1.0}


@dataclass(frozen=True)
class Area:
    """The disc that vehicles drive in."""

    lat: float
    lon: float
    radius_km: float


@dataclass(frozen=True)
class Cadence:
    """How often a signal is sent: every ``every_s``, uniformly within ±``jitter_s``."""

    every_s: float
    jitter_s: float = 0.0


@dataclass(frozen=True)
class Profile:
    """A kind of vehicle: how many of the fleet, how fast, which signals how often."""

    name: str
    weight: float
    speed_kmh: tuple[float, float]
    signals: Mapping[str, Cadence]
    powertrain: Powertrain = "electric"


@dataclass(frozen=True)
class FleetSpec:
    """The whole fleet: ``vehicles`` vehicles drawn from ``profiles`` by weight."""

    seed: int
    vehicles: int
    area: Area
    profiles: tuple[Profile, ...]
    run_id: str = ""
    """Mixed into every trace id: the same seed and run id replay a run exactly, and two
    runs of one seed against one broker stay apart."""


@dataclass(frozen=True, slots=True)
class Emission:
    """A signal the model scheduled: sim time, its vehicle, and the field values then."""

    t_sim: float
    vin: str
    signal: str
    trace_id: str
    fields: dict[str, Any]


def vin_hash(vin: str) -> int:
    """A VIN's stable 64-bit hash, the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(vin.encode(), digest_size=8).digest(), "big")


def shard_of(vin: str, shards: int) -> int:
    """The shard a VIN belongs to."""
    return vin_hash(vin) % shards


def shard_of_trace_id(trace_id: str, shards: int) -> int:
    """The shard whose vehicle sent ``trace_id`` (a fleetprobe trace id: 32 hex digits).

    Every shard's observers see the whole platform's output; this tells a shard which ids
    are another shard's to count, without asking it.
    """
    return int(trace_id[:16], 16) % shards


def run_tag(seed: int, run_id: str) -> str:
    """The 16 bits every trace id of a run carries after the VIN's hash (4 hex digits)."""
    return hashlib.blake2b(f"{seed}/{run_id}".encode(), digest_size=2).hexdigest()


def made_by_run(trace_id: str, tag: str) -> bool:
    """Whether ``trace_id`` carries the run's tag: one of its own signals, however late
    (another run's id carries it by chance once in 65,536)."""
    return trace_id[16:20] == tag


def trace_ids_for(seed: int, run_id: str, vin: str, signal: str, seq: int) -> tuple[str, str]:
    """A W3C trace-id and span-id, derived from the signal's identity (deterministic).

    The trace id's first 64 bits are the VIN's hash (:func:`shard_of_trace_id`), the next
    16 the run's tag (:func:`run_tag`); the rest and the span id depend on the seed, the
    run id, the signal and its sequence number.
    """
    identity = f"{seed}/{run_id}/{vin}/{signal}/{seq}"
    digest = hashlib.blake2b(identity.encode(), digest_size=16).hexdigest()
    return f"{vin_hash(vin):016x}{run_tag(seed, run_id)}{digest[:12]}", digest[16:]


class Vehicle:
    """One vehicle: drives legs between random points, parks, recharges, emits signals."""

    def __init__(self, vin: str, profile: Profile, spec: FleetSpec) -> None:
        self.vin = vin
        self.profile = profile
        self._seed = spec.seed
        self._run_id = spec.run_id
        self._area = spec.area
        self._rng = random.Random(f"{spec.seed}/{vin}/drive")
        self.lat, self.lon = random_point(
            self._rng, spec.area.lat, spec.area.lon, spec.area.radius_km
        )
        self.odometer_km = round(self._rng.uniform(1_000, 80_000), 1)
        self.energy_pct = self._rng.uniform(35.0, 95.0)
        self.heading_deg = 0.0
        self.door = "closed"
        self.locked = False
        self.ignition = True
        self.charging = False
        # The leg being driven (or the stop): positions are interpolated on demand.
        self._leg_start_t = 0.0
        self._leg_end_t = 0.0
        self._leg_to = (self.lat, self.lon)
        self._leg_km = 0.0
        self._leg_speed_kmh = 0.0
        self._charge_start_t: float | None = None

    def start(self, env: simpy.Environment, outbox: list[Emission]) -> None:
        """Start the driving process and one process per signal kind."""
        env.process(self._drive(env))
        for name, cadence in self.profile.signals.items():
            env.process(self._emit(env, name, cadence, outbox))

    def snapshot(self, t: float) -> dict[str, Any]:
        """The vehicle's template fields at sim time ``t``."""
        lat, lon, odometer, energy = self._state_at(t)
        moving = self._leg_start_t <= t < self._leg_end_t
        low, high = self.profile.speed_kmh
        wobble = self._leg_speed_kmh * (1 + 0.05 * math.sin(t / 7.0))
        speed = min(high, max(low, wobble)) if moving else 0.0
        electric = self.profile.powertrain == "electric"
        return {
            "vin": self.vin,
            "profile": self.profile.name,
            "lat": round(lat, 6),
            "lon": round(lon, 6),
            "heading_deg": round(self.heading_deg, 1),
            "speed_kmh": round(speed, 1),
            "odometer_km": round(odometer, 2),
            "battery_pct": round(energy, 1) if electric else None,
            "fuel_pct": None if electric else round(energy, 1),
            "charging": self.charging,
            "ignition": "on" if self.ignition else "off",
            "door": self.door,
            "locked": self.locked,
            "moving": moving,
        }

    def _state_at(self, t: float) -> tuple[float, float, float, float]:
        if t < self._leg_end_t and self._leg_end_t > self._leg_start_t:
            share = (t - self._leg_start_t) / (self._leg_end_t - self._leg_start_t)
            km = self._leg_km * share
            lat = self.lat + (self._leg_to[0] - self.lat) * share
            lon = self.lon + (self._leg_to[1] - self.lon) * share
            used = km * _USE_PCT_PER_KM[self.profile.powertrain]
            return lat, lon, self.odometer_km + km, max(0.0, self.energy_pct - used)
        energy = self.energy_pct
        if self._charge_start_t is not None:
            refill = (t - self._charge_start_t) * _REFILL_PCT_PER_S[self.profile.powertrain]
            energy = min(_FULL_ENERGY_PCT, energy + refill)
        return self.lat, self.lon, self.odometer_km, energy

    def _drive(self, env: simpy.Environment) -> Generator[simpy.Event, Any, None]:
        rng = self._rng
        area = self._area
        low, high = self.profile.speed_kmh
        while True:
            to = random_point(rng, area.lat, area.lon, area.radius_km)
            km = max(0.5, distance_km(self.lat, self.lon, *to))
            speed = rng.uniform(low, high) if high > low else low
            self.heading_deg = bearing_deg(self.lat, self.lon, *to)
            self._leg_start_t, self._leg_to, self._leg_km = env.now, to, km
            self._leg_speed_kmh = speed
            self._leg_end_t = env.now + km / max(speed, 1.0) * 3600.0
            yield env.timeout(self._leg_end_t - env.now)

            self.lat, self.lon = to
            self.odometer_km += km
            self.energy_pct = max(
                0.0, self.energy_pct - km * _USE_PCT_PER_KM[self.profile.powertrain]
            )
            self._leg_speed_kmh = 0.0
            self.ignition, self.door = False, "open"
            yield env.timeout(rng.uniform(5.0, 30.0))
            self.door, self.locked = "closed", True
            rest_s = rng.uniform(60.0, 600.0)
            if self.energy_pct < _LOW_ENERGY_PCT:
                rate = _REFILL_PCT_PER_S[self.profile.powertrain]
                rest_s = (_FULL_ENERGY_PCT - self.energy_pct) / rate
                self.charging, self._charge_start_t = True, env.now
            yield env.timeout(rest_s)
            if self.charging:
                self.energy_pct = self._state_at(env.now)[3]
                self.charging, self._charge_start_t = False, None
            self.locked, self.door = False, "open"
            yield env.timeout(rng.uniform(3.0, 10.0))
            self.door, self.ignition = "closed", True

    def _emit(
        self, env: simpy.Environment, signal: str, cadence: Cadence, outbox: list[Emission]
    ) -> Generator[simpy.Event, Any, None]:
        rng = random.Random(f"{self._seed}/{self.vin}/{signal}")
        yield env.timeout(rng.uniform(0.0, cadence.every_s))  # vehicles do not send in lockstep
        seq = 0
        while True:
            trace_id, span_id = trace_ids_for(self._seed, self._run_id, self.vin, signal, seq)
            fields = self.snapshot(env.now)
            fields.update(
                signal=signal,
                seq=seq,
                trace_id=trace_id,
                traceparent=f"00-{trace_id}-{span_id}-01",
            )
            outbox.append(Emission(env.now, self.vin, signal, trace_id, fields))
            seq += 1
            jitter = rng.uniform(-cadence.jitter_s, cadence.jitter_s) if cadence.jitter_s else 0.0
            yield env.timeout(max(cadence.every_s + jitter, 1e-3))


def build_fleet(spec: FleetSpec, shard: tuple[int, int] = (0, 1)) -> list[Vehicle]:
    """The vehicles of ``spec`` that belong to shard ``index`` of ``count``.

    VINs and profiles are drawn for the whole fleet first, so every shard sees the same
    fleet and the shards together are exactly the unsharded fleet.
    """
    index, count = shard
    rng = random.Random(f"{spec.seed}/fleet")
    weights = [p.weight for p in spec.profiles]
    vehicles = []
    for serial in range(1, spec.vehicles + 1):
        vin = make_vin(rng, serial)
        profile = rng.choices(spec.profiles, weights)[0]
        if count == 1 or shard_of(vin, count) == index:
            vehicles.append(Vehicle(vin, profile, spec))
    return vehicles
