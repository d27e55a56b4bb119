"""The fleet model on simulated time, and the FleetClock that drives it from asyncio."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import Counter, defaultdict

import pytest
import simpy

from fleetprobe.simulator.clock import FleetClock
from fleetprobe.simulator.fleet import (
    Area,
    Cadence,
    Emission,
    FleetSpec,
    Profile,
    build_fleet,
    shard_of,
    shard_of_trace_id,
)
from fleetprobe.simulator.geo import distance_km

AREA = Area(lat=48.78, lon=9.18, radius_km=5.0)
CAR = Profile("car", 3.0, (20.0, 90.0), {"telemetry": Cadence(1.0, 0.2), "door": Cadence(7.0, 3.0)})
TRUCK = Profile(
    "truck", 1.0, (10.0, 60.0), {"telemetry": Cadence(2.0, 0.5)}, powertrain="combustion"
)
SPEC = FleetSpec(seed=7, vehicles=12, area=AREA, profiles=(CAR, TRUCK))
PROFILES = {p.name: p for p in SPEC.profiles}
HEX32 = re.compile(r"[0-9a-f]{32}")


def simulate(spec: FleetSpec, until: float, shard: tuple[int, int] = (0, 1)) -> list[Emission]:
    """Every emission of ``spec`` (or of one shard of it) up to sim time ``until``."""
    env = simpy.Environment()
    outbox: list[Emission] = []
    for vehicle in build_fleet(spec, shard):
        vehicle.start(env, outbox)
    env.run(until=until)
    return outbox


def identity(emissions: list[Emission]) -> list[tuple[object, ...]]:
    """What must repeat exactly for a seed."""
    return [(e.t_sim, e.vin, e.signal, e.trace_id, e.fields) for e in emissions]


@pytest.fixture(scope="module")
def long_run() -> list[Emission]:
    """Two simulated hours of a few vehicles (shared by the invariant tests)."""
    return simulate(FleetSpec(seed=11, vehicles=6, area=AREA, profiles=(CAR, TRUCK)), 7_200)


def test_same_seed_gives_identical_emissions() -> None:
    """Two runs of one spec emit the same VINs, signals, trace ids, sim times and fields."""
    first = simulate(SPEC, 60)
    assert len(first) > 500
    assert identity(simulate(SPEC, 60)) == identity(first)


def test_different_seed_differs() -> None:
    """Another seed gives other VINs and other trace ids."""
    first = simulate(SPEC, 60)
    other = simulate(FleetSpec(seed=8, vehicles=12, area=AREA, profiles=(CAR, TRUCK)), 60)
    assert {e.vin for e in first}.isdisjoint({e.vin for e in other})
    assert {e.trace_id for e in first}.isdisjoint({e.trace_id for e in other})


def test_trace_ids_are_unique_lowercase_hex_and_traceparent_matches() -> None:
    """Trace ids are 32 lowercase hex, unique, and traceparent is 00-<trace>-<16 hex>-01."""
    emissions = simulate(SPEC, 60)
    assert len({e.trace_id for e in emissions}) == len(emissions)
    for e in emissions:
        assert HEX32.fullmatch(e.trace_id)
        assert e.fields["trace_id"] == e.trace_id
        assert re.fullmatch(rf"00-{e.trace_id}-[0-9a-f]{{16}}-01", e.fields["traceparent"])


def test_seq_counts_each_signal_of_a_vehicle() -> None:
    """seq is 0, 1, 2, ... per vehicle and signal, and the fields name the signal."""
    by_stream: dict[tuple[str, str], list[int]] = defaultdict(list)
    for e in simulate(SPEC, 60):
        assert e.fields["signal"] == e.signal and e.fields["vin"] == e.vin
        by_stream[e.vin, e.signal].append(e.fields["seq"])
    for seqs in by_stream.values():
        assert seqs == list(range(len(seqs)))


def test_intervals_stay_within_jitter(long_run: list[Emission]) -> None:
    """Consecutive signals of one vehicle are every ± jitter apart, and start within one every."""
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    cadences = {}
    for e in long_run:
        times[e.vin, e.signal].append(e.t_sim)
        cadences[e.vin, e.signal] = PROFILES[e.fields["profile"]].signals[e.signal]
    for stream, ts in times.items():
        cadence = cadences[stream]
        assert 0.0 <= ts[0] <= cadence.every_s
        low, high = cadence.every_s - cadence.jitter_s, cadence.every_s + cadence.jitter_s
        gaps = [b - a for a, b in itertools.pairwise(ts)]
        assert min(gaps) >= low - 1e-9
        assert max(gaps) <= high + 1e-9
        assert max(gaps) - min(gaps) > cadence.jitter_s  # the jitter is actually applied


def test_positions_stay_inside_the_area(long_run: list[Emission]) -> None:
    """Every reported position is inside the area's disc (to a metre)."""
    # random_point maps the disc flat onto lat/lon; at 49 degrees N that can put a point
    # up to ~0.9 m outside a 5 km radius, so allow 1 m.
    worst = max(distance_km(AREA.lat, AREA.lon, e.fields["lat"], e.fields["lon"]) for e in long_run)
    assert worst <= AREA.radius_km + 0.001
    assert worst > AREA.radius_km * 0.8  # vehicles do roam the area


def test_speed_is_positive_when_moving_and_zero_when_parked(long_run: list[Emission]) -> None:
    """A moving vehicle reports a positive speed; a parked one reports exactly 0."""
    moving = [e.fields for e in long_run if e.fields["moving"]]
    parked = [e.fields for e in long_run if not e.fields["moving"]]
    assert moving and parked
    assert all(f["speed_kmh"] > 0 for f in moving)
    assert all(f["speed_kmh"] == 0.0 for f in parked)


def test_speed_stays_within_the_profile_range_while_moving(long_run: list[Emission]) -> None:
    """A moving vehicle's speed is within its profile's speed_kmh range."""
    for e in long_run:
        if e.fields["moving"]:
            low, high = PROFILES[e.fields["profile"]].speed_kmh
            assert low <= e.fields["speed_kmh"] <= high, e.fields


def test_odometer_never_decreases(long_run: list[Emission]) -> None:
    """Each vehicle's odometer is non-decreasing over its emissions, and it does advance."""
    readings: dict[str, list[float]] = defaultdict(list)
    for e in sorted(long_run, key=lambda e: e.t_sim):
        readings[e.vin].append(e.fields["odometer_km"])
    for values in readings.values():
        assert all(b >= a for a, b in itertools.pairwise(values))
        assert values[-1] > values[0]


def test_energy_stays_between_0_and_100_and_charging_happens() -> None:
    """Battery (electric) and fuel (combustion) stay in 0..100 over long drives with refills."""
    fast = (
        Profile("ev", 1.0, (120.0, 160.0), {"status": Cadence(10.0, 2.0)}),
        Profile("ice", 1.0, (120.0, 160.0), {"status": Cadence(10.0, 2.0)}, "combustion"),
    )
    spec = FleetSpec(seed=3, vehicles=6, area=Area(48.78, 9.18, 40.0), profiles=fast)
    emissions = simulate(spec, 6 * 3_600)
    for e in emissions:
        f = e.fields
        if f["profile"] == "ev":
            assert f["fuel_pct"] is None
            assert 0.0 <= f["battery_pct"] <= 100.0
        else:
            assert f["battery_pct"] is None
            assert 0.0 <= f["fuel_pct"] <= 100.0
    assert {e.fields["profile"] for e in emissions if e.fields["charging"]} == {"ev", "ice"}


def test_profiles_are_drawn_by_weight() -> None:
    """Over 1,000 vehicles, a 3:1 weighting gives about 75% of the first profile."""
    fleet = build_fleet(FleetSpec(seed=5, vehicles=1_000, area=AREA, profiles=(CAR, TRUCK)))
    counts = Counter(v.profile.name for v in fleet)
    assert counts["car"] + counts["truck"] == 1_000
    assert 700 <= counts["car"] <= 800


def test_shards_partition_the_fleet() -> None:
    """The VINs of shards 0..n-1 are disjoint and together exactly the unsharded fleet's."""
    spec = FleetSpec(seed=9, vehicles=90, area=AREA, profiles=(CAR, TRUCK))
    whole = [v.vin for v in build_fleet(spec)]
    shards = [[v.vin for v in build_fleet(spec, (i, 3))] for i in range(3)]
    assert all(shards)
    assert sum(len(s) for s in shards) == len(whole) == 90
    assert set().union(*shards) == set(whole)
    whole_profiles = {v.vin: v.profile for v in build_fleet(spec)}
    for i in range(3):
        assert all(whole_profiles[v.vin] == v.profile for v in build_fleet(spec, (i, 3)))


def test_a_trace_id_names_the_shard_of_its_vehicle() -> None:
    """Every trace id a vehicle sends maps to the vehicle's shard, for any shard count."""
    emissions = simulate(SPEC, 30)
    assert len({e.trace_id for e in emissions}) == len(emissions)
    for count in (2, 3, 7):
        assert all(
            shard_of_trace_id(e.trace_id, count) == shard_of(e.vin, count) for e in emissions
        )


def test_a_vehicle_emits_the_same_in_a_shard_as_in_the_whole_fleet() -> None:
    """Each vehicle's emissions are identical whether simulated in its shard or the whole fleet."""
    whole = simulate(SPEC, 60)
    sharded = [e for i in range(3) for e in simulate(SPEC, 60, (i, 3))]

    def per_vin(emissions: list[Emission]) -> dict[str, list[tuple[object, ...]]]:
        grouped: dict[str, list[Emission]] = defaultdict(list)
        for e in emissions:
            grouped[e.vin].append(e)
        return {
            vin: sorted(identity(es), key=lambda r: (r[0], r[2])) for vin, es in grouped.items()
        }

    assert per_vin(sharded) == per_vin(whole)


# --- FleetClock --------------------------------------------------------------------------

EVERY_SECOND = FleetSpec(
    seed=21,
    vehicles=5,
    area=AREA,
    profiles=(Profile("car", 1.0, (20.0, 90.0), {"telemetry": Cadence(1.0)}),),
)


def started(spec: FleetSpec) -> tuple[simpy.Environment, list[Emission]]:
    """A fresh environment with the fleet's processes started."""
    env = simpy.Environment()
    outbox: list[Emission] = []
    for vehicle in build_fleet(spec):
        vehicle.start(env, outbox)
    return env, outbox


def test_clock_rejects_non_positive_speed() -> None:
    """A speed of 0 or less is a ValueError."""
    env, outbox = started(EVERY_SECOND)
    with pytest.raises(ValueError, match="speed"):
        FleetClock(env, outbox, speed=0.0)


async def test_clock_runs_the_fleet_in_step_with_the_wall_clock() -> None:
    """At speed 10, run(1.0) hands over 10 sim-seconds of emissions in order, in about 1 s."""
    env, outbox = started(EVERY_SECOND)
    clock = FleetClock(env, outbox, speed=10.0)
    seen: list[tuple[Emission, int, int]] = []

    async def handle(emission: Emission, intended_ns: int) -> None:
        seen.append((emission, intended_ns, time.monotonic_ns()))

    started_at = time.monotonic()
    async with asyncio.timeout(10.0):
        await clock.run(1.0, handle)
    wall_s = time.monotonic() - started_at

    # It keeps the wall clock: never faster (10 sim-seconds take 1 s); the upper bound is
    # loose because a busy machine runs the loop late, which is not what this test is about.
    assert 0.8 <= wall_s < 5.0
    t_sims = [e.t_sim for e, _, _ in seen]
    assert t_sims == sorted(t_sims)
    assert all(t < 10.0 for t in t_sims)
    intended = [i for _, i, _ in seen]
    assert intended == sorted(intended)
    assert all(i == clock.intended_ns(e.t_sim) for e, i, _ in seen)
    # never handed over before it is due (1 us for float rounding in intended_ns)
    assert all(at >= i - 1_000 for _, i, at in seen)

    reference_env, reference = started(EVERY_SECOND)
    reference_env.run(until=10.0)
    expected = Counter(e.vin for e in reference)
    got = Counter(e.vin for e, _, _ in seen)
    assert set(got) == set(expected)
    assert all(abs(got[vin] - expected[vin]) <= 1 for vin in expected)


async def test_clock_stop_from_the_handler_ends_run_promptly() -> None:
    """clock.stop() called by the handler makes run return before the next emission."""
    env, outbox = started(EVERY_SECOND)
    clock = FleetClock(env, outbox, speed=10.0)
    calls = 0

    async def handle(emission: Emission, intended_ns: int) -> None:
        nonlocal calls
        calls += 1
        clock.stop()

    started_at = time.monotonic()
    async with asyncio.timeout(30.0):
        await clock.run(60.0, handle)
    assert calls == 1  # no emission after the stop
    assert time.monotonic() - started_at < 30.0  # not the 60 s it was given


async def test_clock_yields_to_the_event_loop_while_waiting() -> None:
    """While the clock waits for due events, other tasks on the loop keep running."""
    env, outbox = started(EVERY_SECOND)
    clock = FleetClock(env, outbox, speed=10.0)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    async def handle(emission: Emission, intended_ns: int) -> None:
        pass

    ticker = asyncio.create_task(tick())
    try:
        async with asyncio.timeout(3.0):
            await clock.run(0.5, handle)
    finally:
        ticker.cancel()
    # ~100 when the loop is free, fewer when the machine is busy; a clock that blocked the
    # loop while it waits would allow ~1.
    assert ticks >= 10
