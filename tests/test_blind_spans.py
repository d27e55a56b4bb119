"""The prober's blind spans, and the tracker never blaming the platform for them: on
explicit times, and one real stall of a real loop."""

from __future__ import annotations

import asyncio
import time

from test_tracker import MS, T0, Recorder, S, follow, make, tid

from fleetprobe.core.blind_spans import (
    BACKLOG,
    STALL,
    TOLERANCE_NS,
    BlindSpan,
    BlindSpans,
    LoopWatch,
)
from fleetprobe.core.results import HopResult, Verdict
from fleetprobe.probes.chains import ChainSpec, HopSpec
from fleetprobe.probes.tracker import Tracker, sweep_deadlines

KEEP = 10 * S
ONE_HOP = ChainSpec("c", "telemetry", (HopSpec("broker", 1.0),))


def test_spans_shorter_than_the_tolerance_are_not_recorded() -> None:
    closed: list[BlindSpan] = []
    blind = BlindSpans(KEEP, closed.append)
    blind.add(T0, T0 + TOLERANCE_NS - 1, STALL)
    assert closed == [] and blind.earliest_arrival(T0 + 10 * MS) is None
    blind.add(T0, T0 + TOLERANCE_NS, STALL)
    assert closed == [BlindSpan(T0, T0 + TOLERANCE_NS, STALL)]


def test_a_read_in_or_at_the_end_of_a_span_may_have_arrived_when_it_began() -> None:
    blind = BlindSpans(KEEP)
    blind.add(T0, T0 + 200 * MS, STALL)
    assert blind.earliest_arrival(T0 + 200 * MS) == T0  # the read that ended the stall
    assert blind.earliest_arrival(T0 + 100 * MS) == T0
    assert blind.earliest_arrival(T0 + 300 * MS) is None  # read well after: exact
    assert blind.earliest_arrival(T0 - 1) is None


def test_only_a_backlog_can_have_lost_anything() -> None:
    """A stall delays reads; only a backlog (bytes the prober left unread, a queue it let
    overflow) lets a broker drop what was meant for it."""
    blind = BlindSpans(KEEP)
    blind.add(T0, T0 + 200 * MS, STALL)
    assert not blind.may_have_lost(T0 - S, T0 + S)
    blind.open("observer", T0 + 2 * S)
    assert blind.falling_behind(T0 + 2 * S + TOLERANCE_NS)
    assert not blind.falling_behind(T0 + 2 * S + TOLERANCE_NS - 1)
    assert blind.may_have_lost(T0 + S, T0 + 3 * S)  # still open
    assert not blind.may_have_lost(T0, T0 + S)
    blind.close("observer", T0 + 3 * S)
    assert not blind.behind
    assert blind.may_have_lost(T0 + 2500 * MS, T0 + 4 * S)
    assert not blind.may_have_lost(T0 + 3 * S, T0 + 4 * S)  # after it closed


def test_a_closed_backlog_without_an_opening_is_recorded_from_its_start() -> None:
    """A queue that overflowed: blind from the oldest message still waiting until now."""
    closed: list[BlindSpan] = []
    blind = BlindSpans(KEEP, closed.append)
    blind.close("observer", T0 + S, since_ns=T0)
    assert closed == [BlindSpan(T0, T0 + S, BACKLOG)]


def test_old_spans_are_forgotten_after_keep() -> None:
    blind = BlindSpans(KEEP)
    blind.add(T0, T0 + 100 * MS, BACKLOG)
    blind.add(T0 + 20 * S, T0 + 20 * S + 100 * MS, STALL)
    assert not blind.may_have_lost(T0, T0 + S)


async def test_caught_up_returns_once_every_source_caught_up() -> None:
    blind = BlindSpans(KEEP)
    await asyncio.wait_for(blind.caught_up(), 1)  # nobody behind: at once
    blind.open("a", T0)
    blind.open("b", T0)
    waiting = asyncio.create_task(blind.caught_up())
    await asyncio.sleep(0)
    blind.close("a", T0 + S)
    await asyncio.sleep(0)
    assert not waiting.done()
    blind.close("b", T0 + S)
    await asyncio.wait_for(waiting, 1)


async def test_the_loop_watch_notes_a_real_stall_and_a_busy_loop() -> None:
    closed: list[BlindSpan] = []
    stalled = asyncio.Event()

    def on_span(span: BlindSpan) -> None:
        closed.append(span)
        stalled.set()

    watch = LoopWatch(BlindSpans(KEEP, on_span), interval_s=0.005)
    beating = asyncio.create_task(watch.run())
    try:
        await asyncio.sleep(0.05)  # a few beats of an idle loop
        assert not watch.busy and closed == []
        time.sleep(0.2)  # noqa: ASYNC251 - the loop is held up: nothing runs on it
        await asyncio.wait_for(stalled.wait(), 5)
        assert closed[0].cause == STALL
        assert closed[0].end_ns - closed[0].start_ns >= 200 * MS
        for _ in range(40):  # a loop short of CPU: every beat finds it at work
            await asyncio.sleep(0)
            time.sleep(0.007)  # noqa: ASYNC251 - work that holds the loop past each beat
        assert watch.busy
    finally:
        beating.cancel()


def blind_tracker(blind: BlindSpans, chain: ChainSpec = ONE_HOP) -> tuple[Tracker, Recorder]:
    tracker, rec = make(chain)
    tracker._blind = blind
    return tracker, rec


def test_a_sighting_read_late_by_a_stall_over_its_deadline_is_inconclusive() -> None:
    """Sent at T0, due by T0+1s; the loop stalled from T0+0.9s to T0+1.2s and read it then:
    it may have arrived in time. Inconclusive, not a timeout, and no late message."""
    blind = BlindSpans(KEEP)
    tracker, rec = blind_tracker(blind)
    s = follow(tracker, tid(1))
    blind.add(T0 + 900 * MS, T0 + 1200 * MS, STALL)
    tracker.observe(0, 0, tid(1), T0 + 1200 * MS)
    assert s.results == [HopResult.INCONCLUSIVE] and s.verdict is Verdict.INCONCLUSIVE
    assert rec.unmatched_marks == []
    assert not s.latency_known(0)


def test_a_sighting_read_late_after_its_deadline_passed_unseen_is_still_late() -> None:
    """The stall began after the deadline: it arrived late whatever the stall did."""
    blind = BlindSpans(KEEP)
    tracker, _ = blind_tracker(blind)
    s = follow(tracker, tid(1))
    blind.add(T0 + 1100 * MS, T0 + 1300 * MS, STALL)
    tracker.observe(0, 0, tid(1), T0 + 1300 * MS)
    assert s.results == [HopResult.TIMEOUT] and s.verdict is Verdict.FAILED


def test_a_sighting_in_time_read_in_a_span_is_ok_with_an_inexact_latency() -> None:
    blind = BlindSpans(KEEP)
    tracker, _ = blind_tracker(blind)
    s = follow(tracker, tid(1))
    blind.add(T0 + 100 * MS, T0 + 400 * MS, STALL)
    tracker.observe(0, 0, tid(1), T0 + 400 * MS)
    assert s.verdict is Verdict.OK and not s.latency_known(0)
    assert s.latency_s(0) == 0.4  # at most that


def test_a_timeout_during_a_backlog_is_inconclusive_and_without_one_a_timeout() -> None:
    blind = BlindSpans(KEEP)
    tracker, _ = blind_tracker(blind)
    lost = follow(tracker, tid(1))
    clean = follow(tracker, tid(2), sent_ns=T0 + 3 * S)
    blind.open("observer", T0 + 500 * MS)
    blind.close("observer", T0 + 800 * MS)
    tracker.expire(T0 + 5 * S)
    assert lost.results == [HopResult.INCONCLUSIVE] and lost.verdict is Verdict.INCONCLUSIVE
    assert clean.results == [HopResult.TIMEOUT] and clean.verdict is Verdict.FAILED


def test_a_failure_elsewhere_makes_a_chain_failed_despite_an_inconclusive_hop() -> None:
    chain = ChainSpec("c", "telemetry", (HopSpec("a", 1.0), HopSpec("b", 2.0)))
    blind = BlindSpans(KEEP)
    tracker, _ = blind_tracker(blind, chain)
    s = follow(tracker, tid(1))
    blind.add(T0 + 900 * MS, T0 + 1100 * MS, STALL)
    tracker.observe(0, 0, tid(1), T0 + 1100 * MS)
    tracker.expire(T0 + 2 * S)
    assert s.results == [HopResult.INCONCLUSIVE, HopResult.TIMEOUT]
    assert s.verdict is Verdict.FAILED and s.failed_hop == 1


def test_an_earlier_hop_read_late_never_makes_a_later_one_out_of_order() -> None:
    chain = ChainSpec("c", "telemetry", (HopSpec("a", 1.0), HopSpec("b", 2.0)))
    blind = BlindSpans(KEEP)
    tracker, _ = blind_tracker(blind, chain)
    s = follow(tracker, tid(1))
    tracker.observe(0, 1, tid(1), T0 + 100 * MS)  # b, read promptly
    blind.add(T0 + 50 * MS, T0 + 400 * MS, STALL)
    tracker.observe(0, 0, tid(1), T0 + 400 * MS)  # a, read late: it only seems to be later
    assert s.results == [HopResult.OK, HopResult.INCONCLUSIVE]
    assert s.verdict is Verdict.INCONCLUSIVE


def test_sightings_of_a_shed_signal_are_nobodys_to_count() -> None:
    tracker, rec = make(ONE_HOP)
    tracker.shed(0, tid(1), T0)
    tracker.observe(0, 0, tid(1), T0 + 10 * MS)
    tracker.observe(0, 0, tid(2), T0 + 10 * MS)
    assert rec.unmatched_marks == [(0, 0, "unknown_trace_id")]
    assert tracker.idle and rec.verdicts == []


async def test_the_sweep_expires_nothing_past_the_watermark() -> None:
    """What an observer has not handed over yet never times out: the sweep waits for it."""
    tracker, rec = make(ONE_HOP)
    sent_ns = time.monotonic_ns()
    follow(tracker, tid(1), sent_ns=sent_ns - 2 * S)  # due a second ago
    held_until = [sent_ns - 2 * S]  # the observer has read nothing since it was sent

    sweeping = asyncio.create_task(
        sweep_deadlines(tracker, lambda: tracker.idle, watermark=lambda now: held_until[0])
    )
    await asyncio.sleep(0.05)
    assert rec.verdicts == []
    tracker.observe(0, 0, tid(1), sent_ns - 1500 * MS)  # it was there all along, in time
    held_until[0] = time.monotonic_ns()
    await asyncio.wait_for(sweeping, 2)
    assert [v.verdict for v in rec.verdicts] == [Verdict.OK]
