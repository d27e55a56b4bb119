"""Judging expected outcomes of faults, and the timeline that times them (pure logic)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from fleetprobe.app.outcomes import ExpectedOutcome, FaultTimes, SignalLedger, SignalRecord, judge
from fleetprobe.app.scenario.faults import ExpectConfig
from fleetprobe.core.errors import FleetprobeError
from fleetprobe.faults.timeline import Timeline, Window
from fleetprobe.probes.chains import ChainSpec, HopSpec

S = 1_000_000_000  # ns


def chain() -> ChainSpec:
    hops = tuple(HopSpec(name, within_s=1.0) for name in ("broker", "gateway", "processor"))
    return ChainSpec(name="c", signal="telemetry", hops=hops)


def record(sent_s: float, failed_hop: int = -1, latency_s: float = 0.001) -> SignalRecord:
    ok = tuple(failed_hop < 0 or hop < failed_hop for hop in range(3))
    latencies = tuple(latency_s if hop_ok else None for hop_ok in ok)
    return SignalRecord(round(sent_s * S), failed_hop, ok, latencies)


class Ledger(SignalLedger):
    """A ledger filled with records directly."""

    def __init__(self, records: list[SignalRecord]) -> None:
        super().__init__({0})
        self._records[0] = records


def outcome(
    expect: dict[str, object], records: list[SignalRecord], **faults: FaultTimes
) -> ExpectedOutcome:
    times = faults or {"f": FaultTimes("f", 10 * S, 20 * S)}
    config = ExpectConfig.model_validate({"fault": "f", "chain": "c", **expect})
    (result,) = judge([config], (chain(),), Ledger(records), times, 40 * S)
    return result


def test_fails_at_counts_only_signals_sent_during_the_fault() -> None:
    records = [record(t) for t in range(0, 10)]
    records += [record(10 + t / 2, failed_hop=2) for t in range(19)] + [record(19.9)]
    records += [record(t, failed_hop=0) for t in range(25, 27)]  # after: not judged here
    result = outcome({"fails_at": "processor", "min_ratio": 0.9}, records)
    assert result.ok and result.measured == pytest.approx(19 / 20) and result.signals == 20


def test_fails_at_fails_when_an_earlier_hop_broke() -> None:
    records = [record(10 + t / 2, failed_hop=2) for t in range(19)] + [record(15.2, 0)]
    result = outcome({"fails_at": "processor", "min_ratio": 0.5}, records)
    assert not result.ok
    assert "1 failed earlier, first at broker" in result.explanation


def test_recovery_is_from_the_end_to_the_first_ok_after_the_last_failure() -> None:
    records = [
        record(19, 1),
        record(20.5, 1),
        record(21.0, 1),
        record(21.7),
        record(22),
        record(23),
    ]
    result = outcome({"hop": "gateway", "recovers_within": "2s"}, records)
    assert result.ok and result.measured == pytest.approx(1.7)
    result = outcome({"hop": "gateway", "recovers_within": "1s"}, records)
    assert not result.ok


def test_never_ok_again_is_no_recovery() -> None:
    records = [record(21, 1), record(30, 1)]
    result = outcome({"hop": "gateway", "recovers_within": "5s"}, records)
    assert not result.ok and result.measured is None


def test_latency_added_compares_medians_inside_and_outside() -> None:
    records = [record(t, latency_s=0.002) for t in range(0, 9)]
    records += [record(10 + t / 4, latency_s=0.202) for t in range(30)]
    records += [record(t, latency_s=0.002) for t in range(22, 40)]
    result = outcome({"hop": "broker", "latency_added": {"min": "190ms", "max": "210ms"}}, records)
    assert result.ok and result.measured == pytest.approx(0.2)


def test_no_loss_outside_leaves_a_margin_around_each_fault() -> None:
    # Lost 0.5 s before the fault: inside the default margin (the longest within, 1 s).
    records = [record(5), record(9.5, failed_hop=0), record(15, 0), record(30)]
    assert outcome({"hop": "broker", "no_loss_outside": True}, records).ok
    result = outcome({"hop": "broker", "no_loss_outside": True, "margin": "0s"}, records)
    assert not result.ok and result.measured == 1


def test_an_outcome_of_a_fault_that_never_took_effect_fails_saying_why() -> None:
    result = outcome(
        {"fails_at": "broker"},
        [record(12)],
        f=FaultTimes("f", None, None, ("apply: toxiproxy refused",)),
    )
    assert not result.ok and "never took effect (apply: toxiproxy refused)" in result.explanation


async def test_the_timeline_applies_and_reverts_on_time_and_records_errors() -> None:
    events: list[tuple[str, float]] = []
    done = {what: asyncio.Event() for what in ("a on", "a off", "c on", "c off", "b off")}
    start = time.monotonic_ns()

    def action(what: str) -> Callable[[], Awaitable[None]]:
        async def act() -> None:
            events.append((what, (time.monotonic_ns() - start) / S))
            done[what].set()

        return act

    async def broken() -> None:
        raise FleetprobeError("refused")

    windows = [
        Window("a", "latency", "p", 0.05, 0.1, action("a on"), action("a off")),
        Window("b", "down", "p", 0.02, 0.5, broken, action("b off")),
        Window("c", "stage", "u", 0.1, 1.0, action("c on"), action("c off")),
    ]
    changes: list[tuple[str, bool]] = []
    timeline = Timeline(windows, lambda w, on: changes.append((w.name, on)))
    runner = asyncio.create_task(timeline.run(start))
    await asyncio.wait_for(done["a off"].wait(), 5)
    runner.cancel()  # an interrupted run: c is still on, and is reverted on the way out
    await timeline.revert_active()
    assert [e for e, _ in events] == ["a on", "c on", "a off", "c off"]
    at = dict(events)
    # Never early: on at 0.05 s, off at 0.15 s of the timeline. No tight upper bound: a
    # loaded machine runs every callback late, and lateness is not what this test is about.
    assert 0.05 <= at["a on"] < 1.0 and 0.15 <= at["a off"] < 1.1
    assert windows[1].errors == ["apply: refused"] and windows[1].applied_ns is None
    assert changes == [("a", True), ("c", True), ("a", False), ("c", False)]
