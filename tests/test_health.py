"""Hop health over a sliding window: states, changes, gauge and report, on explicit times."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from fleetprobe.core.events import HealthChange, RunEvents
from fleetprobe.core.results import FAILURES, FollowedSignal, HopResult, Verdict
from fleetprobe.exporters.health import HealthMonitor, HealthPolicy, HopHealth
from fleetprobe.probes.chains import ChainSpec, HopSpec
from fleetprobe.probes.tracker import Tracker

T0 = 1_000_000_000_000  # a monotonic time in ns; never 0, which the tracker means "not seen"
MS = 1_000_000
S = 1_000_000_000
WALL = 1_795_341_600_123_456_789  # 2026-11-22T10:00:00.123456789Z

CHAIN = ChainSpec(
    "telemetry-to-api",
    "telemetry",
    (HopSpec("broker", 1.0), HopSpec("processor", 2.0), HopSpec("api", 3.0)),
)
OK, TIMEOUT, SUPERSEDED = HopResult.OK, HopResult.TIMEOUT, HopResult.SUPERSEDED


def signal(*results: HopResult, sent_ns: int = T0, step_ms: int = 100) -> FollowedSignal:
    """A judged signal of CHAIN with these hop results; seen hops ``step_ms`` apart."""
    followed = FollowedSignal(
        0, len(results), "0" * 32, "telemetry", "VIN", sent_ns, sent_ns, 7, None
    )
    for hop, result in enumerate(results):
        followed.results[hop] = result
        if result is not HopResult.TIMEOUT and result is not HopResult.SUPERSEDED:
            followed.seen_ns[hop] = sent_ns + (hop + 1) * step_ms * MS
    failed = next((h for h, r in enumerate(results) if r in FAILURES), None)
    followed.verdict = Verdict.OK if failed is None else Verdict.FAILED
    followed.failed_hop = failed
    return followed


def monitor(
    policy: HealthPolicy | None = None, chain: ChainSpec = CHAIN
) -> tuple[HealthMonitor, CollectorRegistry]:
    """A monitor of ``chain`` (default: CHAIN) on a fresh registry."""
    registry = CollectorRegistry()
    return HealthMonitor([chain], policy or HealthPolicy(), registry, "demo"), registry


def up_value(registry: CollectorRegistry, hop: str) -> float | None:
    """The fleetprobe_hop_up sample of a hop of CHAIN."""
    labels = {"scenario": "demo", "chain": CHAIN.name, "hop": hop}
    return registry.get_sample_value("fleetprobe_hop_up", labels)


def feed(health: HealthMonitor, count: int, *results: HopResult, at_ns: int = T0) -> None:
    """Record ``count`` signals with the same results, 1 ms apart from ``at_ns``."""
    for i in range(count):
        health.record(signal(*results, sent_ns=at_ns + i * MS), at_ns + i * MS)


def test_gauges_start_up_and_all_ok_changes_nothing() -> None:
    """Every hop exports fleetprobe_hop_up=1 up front, and all-ok results keep it so."""
    health, registry = monitor()
    assert [up_value(registry, h.name) for h in CHAIN.hops] == [1.0, 1.0, 1.0]
    feed(health, 20, OK, OK, OK)
    assert health.evaluate(T0 + S, wall_ns=WALL) == []
    assert [up_value(registry, h.name) for h in CHAIN.hops] == [1.0, 1.0, 1.0]
    assert health.hop(0, 2).samples == 20
    assert health.hop(0, 2).success_ratio == 1.0


def test_below_objective_goes_down_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    """61% ok at a hop turns it down: one change, gauge 0, a WARNING naming the root."""
    health, registry = monitor()
    feed(health, 61, OK, OK, OK)
    feed(health, 39, OK, OK, TIMEOUT, at_ns=T0 + 100 * MS)
    with caplog.at_level(logging.INFO, logger="fleetprobe.health"):
        changes = health.evaluate(T0 + S, wall_ns=WALL)
    assert changes == [
        HealthChange(
            chain=CHAIN.name,
            hop="api",
            up=False,
            at_wall_ns=WALL,
            success_ratio=0.61,
            samples=100,
            first_failing_hop="api",
            window_s=30.0,
            objective=0.95,
        )
    ]
    assert up_value(registry, "api") == 0.0
    assert up_value(registry, "processor") == 1.0
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.WARNING,
            "hop telemetry-to-api > api is DOWN: 61.0% ok over the last 30s "
            "(objective 95.0%); first failing hop: api",
        )
    ]
    assert health.evaluate(T0 + S + MS, wall_ns=WALL) == []  # only transitions are returned


def test_ratio_exactly_at_objective_is_up() -> None:
    """19 ok of 20 meets a 95% objective (at or above is up)."""
    health, _ = monitor(chain=ChainSpec("one-hop", "telemetry", (HopSpec("broker", 1.0),)))
    feed(health, 19, OK)
    feed(health, 1, TIMEOUT, at_ns=T0 + 100 * MS)
    assert health.evaluate(T0 + S, wall_ns=WALL) == []
    assert health.hop(0, 0).success_ratio == 0.95


def test_failures_leave_the_window_and_the_hop_recovers(caplog: pytest.LogCaptureFixture) -> None:
    """Failures expire after window_s; an empty window keeps the state; ok results bring it up."""
    health, registry = monitor(HealthPolicy(window_s=10.0))
    feed(health, 5, OK, TIMEOUT, TIMEOUT)
    assert [c.hop for c in health.evaluate(T0 + S, wall_ns=WALL)] == ["processor"]
    # Exactly one window after the last failure, every failure has left the window.
    last_ns = T0 + 4 * MS
    assert health.evaluate(last_ns + 10 * S - 1, wall_ns=WALL) == []
    assert health.hop(0, 1).samples == 1
    assert health.evaluate(last_ns + 10 * S, wall_ns=WALL) == []  # empty: state kept
    assert health.hop(0, 1).samples == 0
    assert up_value(registry, "processor") == 0.0
    feed(health, 3, OK, OK, OK, at_ns=T0 + 20 * S)
    with caplog.at_level(logging.INFO, logger="fleetprobe.health"):
        (change,) = health.evaluate(T0 + 21 * S, wall_ns=WALL + 21 * S)
    assert (change.hop, change.up, change.samples, change.first_failing_hop) == (
        "processor",
        True,
        3,
        None,
    )
    assert up_value(registry, "processor") == 1.0
    assert caplog.records[-1].levelno == logging.INFO
    assert "processor is UP: 100.0% ok over the last 10s" in caplog.records[-1].getMessage()


def test_skipped_hops_are_not_counted_and_superseded_is_ok() -> None:
    """Failures downstream of the first failing hop add no sample; superseded counts as ok."""
    health, registry = monitor()
    feed(health, 10, TIMEOUT, TIMEOUT, TIMEOUT)
    feed(health, 10, OK, OK, SUPERSEDED, at_ns=T0 + S)
    assert [health.hop(0, h).samples for h in range(3)] == [20, 10, 10]
    assert health.hop(0, 2).success_ratio == 1.0
    changes = health.evaluate(T0 + 2 * S, wall_ns=WALL)
    assert [(c.hop, c.up, c.first_failing_hop) for c in changes] == [("broker", False, "broker")]
    assert [up_value(registry, h.name) for h in CHAIN.hops] == [0.0, 1.0, 1.0]


def test_min_samples_holds_the_state_until_enough_results() -> None:
    """With min_samples=5, four failures change nothing; the fifth turns the hop down."""
    health, registry = monitor(HealthPolicy(min_samples=5))
    feed(health, 4, OK, OK, TIMEOUT)
    assert health.evaluate(T0 + S, wall_ns=WALL) == []
    assert up_value(registry, "api") == 1.0
    health.record(signal(OK, OK, TIMEOUT), T0 + S)
    (change,) = health.evaluate(T0 + S + MS, wall_ns=WALL)
    assert (change.hop, change.up, change.samples) == ("api", False, 5)


def test_cascade_names_the_first_failing_hop() -> None:
    """Two hops down name the upstream one as root; when it recovers, the root moves down."""
    health, _ = monitor(HealthPolicy(window_s=5.0))
    feed(health, 10, OK, TIMEOUT, TIMEOUT)  # processor fails; api is skipped
    feed(health, 10, OK, OK, TIMEOUT, at_ns=T0 + 100 * MS)  # api fails on its own
    changes = health.evaluate(T0 + S, wall_ns=WALL)
    assert [(c.hop, c.up, c.first_failing_hop) for c in changes] == [
        ("processor", False, "processor"),
        ("api", False, "processor"),
    ]
    feed(health, 40, OK, OK, TIMEOUT, at_ns=T0 + 10 * S)  # the old window is gone
    changes = health.evaluate(T0 + 11 * S, wall_ns=WALL + 10 * S)
    assert [(c.hop, c.up, c.first_failing_hop) for c in changes] == [("processor", True, "api")]
    assert [(c.hop, c.up) for c in health.changes] == [
        ("processor", False),
        ("api", False),
        ("processor", True),
    ]


def test_aborted_signals_add_nothing() -> None:
    """A signal aborted by an interrupted run is no sample for any hop."""
    health, _ = monitor()
    aborted = signal(TIMEOUT, OK, OK)
    aborted.results[2] = None
    aborted.verdict, aborted.failed_hop = Verdict.ABORTED, None
    health.record(aborted, T0)
    assert [health.hop(0, h).samples for h in range(3)] == [0, 0, 0]


def test_report_has_iso_utc_times_and_json_ready_fields() -> None:
    """as_report() lists every change with its time as ISO-8601 UTC, microseconds and Z."""
    health, _ = monitor()
    feed(health, 3, OK, TIMEOUT, TIMEOUT)
    health.evaluate(T0 + S, wall_ns=WALL)
    assert health.as_report() == [
        {
            "chain": CHAIN.name,
            "hop": "processor",
            "state": "down",
            "at": "2026-11-22T10:00:00.123456Z",
            "success_ratio": 0.0,
            "samples": 3,
            "window_s": 30.0,
            "objective": 0.95,
            "first_failing_hop": "processor",
        }
    ]


def test_recent_latencies_give_quantiles_and_stay_bounded() -> None:
    """Ok latencies in the window give p50/p99; at most 10,000 are kept, the oldest dropped."""
    hop = HopHealth(window_s=60.0)
    for i in range(10_050):
        hop.record(T0 + i * MS, True, (i + 1) / 1000)
    hop.record(T0 + 10_050 * MS, False, None)
    assert hop.latency_count == 10_000
    assert hop.samples == 10_051
    assert hop.recent_quantile(0.0) == pytest.approx(0.051)  # the first 50 were dropped
    assert hop.recent_quantile(0.5) == pytest.approx(5.050)
    assert hop.recent_quantile(0.99) == pytest.approx(9.950)
    assert hop.recent_quantile(1.0) == pytest.approx(10.050)
    hop.expire(T0 + 10_049 * MS + 60 * S)
    assert hop.latency_count == 0
    assert hop.recent_quantile(0.5) is None
    assert hop.samples == 1  # the failure, recorded last, is still in the window


def test_a_real_tracker_drives_the_monitor() -> None:
    """Verdicts from a Tracker, recorded at the time they are given, turn a failing hop down."""
    health, registry = monitor(HealthPolicy(window_s=10.0, min_samples=4))
    clock = [T0]

    class Listener(RunEvents):
        """Forwards verdicts to the monitor at the current fake time."""

        def verdict(self, followed: FollowedSignal) -> None:
            health.record(followed, clock[0])

    tracker = Tracker([CHAIN], Listener())
    for n in range(4):
        sent = T0 + n * 10 * MS
        tracker.follow(0, f"{n:032x}", "telemetry", "VIN", sent, sent, 7, {})
        tracker.observe(0, 0, f"{n:032x}", sent + 5 * MS)
        if n == 0:  # the only signal the processor sees: it alone reaches the api
            tracker.observe(0, 1, f"{n:032x}", sent + 8 * MS)
            tracker.observe(0, 2, f"{n:032x}", sent + 9 * MS)
    clock[0] = T0 + 4 * S  # past every deadline
    tracker.expire(clock[0])
    assert [health.hop(0, h).samples for h in range(3)] == [4, 4, 1]
    changes = health.evaluate(clock[0], wall_ns=WALL)
    assert [(c.hop, c.up, c.success_ratio, c.first_failing_hop) for c in changes] == [
        ("processor", False, 0.25, "processor")
    ]
    assert up_value(registry, "processor") == 0.0
    assert up_value(registry, "api") == 1.0  # one sample, fewer than min_samples
    assert health.hop(0, 0).recent_quantile(0.5) == pytest.approx(0.005)


def test_policy_rejects_nonsense() -> None:
    """A window of zero, a ratio above 1 or min_samples of 0 is refused."""
    with pytest.raises(ValueError):
        HealthPolicy(window_s=0.0)
    with pytest.raises(ValueError):
        HealthPolicy(min_success_ratio=1.5)
    with pytest.raises(ValueError):
        HealthPolicy(min_samples=0)
