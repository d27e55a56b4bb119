"""The tracker: hop results, verdicts, deadlines, retirement and sampling, on explicit times."""

from __future__ import annotations

import random
from typing import Any

import pytest

from fleetprobe.core.events import RunEvents
from fleetprobe.core.results import FollowedSignal, HopResult, Verdict
from fleetprobe.probes.chains import ChainSpec, Expectation, HopSpec
from fleetprobe.probes.trace_ids import LATE, MISSING, UNKNOWN_TRACE_ID
from fleetprobe.probes.tracker import Tracker
from fleetprobe.simulator.templates import TextTemplate

T0 = 1_000_000_000_000  # a monotonic time in ns; never 0, which the tracker means "not seen"
MS = 1_000_000
S = 1_000_000_000

THREE_HOPS = ChainSpec(
    "telemetry",
    "telemetry",
    (HopSpec("broker", 1.0), HopSpec("processor", 2.0), HopSpec("api", 3.0)),
)
FIELDS = {"vin": "WBA00000000000001", "speed_kmh": 50, "locked": True}


class Recorder(RunEvents):
    """A sink of the run's events that records every call in order."""

    def __init__(self) -> None:
        self.verdicts: list[FollowedSignal] = []
        self.retired_signals: list[FollowedSignal] = []
        self.duplicate_marks: list[tuple[int, int]] = []
        self.unmatched_marks: list[tuple[int, int, str]] = []
        self.events: list[tuple[str, str]] = []

    def verdict(self, signal: FollowedSignal) -> None:
        self.verdicts.append(signal)
        self.events.append(("verdict", signal.trace_id))

    def retired(self, signal: FollowedSignal) -> None:
        self.retired_signals.append(signal)
        self.events.append(("retired", signal.trace_id))

    def duplicate(self, chain_index: int, hop_index: int) -> None:
        self.duplicate_marks.append((chain_index, hop_index))

    def unmatched(self, chain_index: int, hop_index: int, reason: str) -> None:
        self.unmatched_marks.append((chain_index, hop_index, reason))


def tid(n: int) -> str:
    """A distinct, well-formed trace id."""
    return f"{n:032x}"


def make(*chains: ChainSpec) -> tuple[Tracker, Recorder]:
    """A tracker over ``chains`` (default: the three-hop chain) with a recording listener."""
    recorder = Recorder()
    return Tracker(chains or (THREE_HOPS,), recorder), recorder


def follow(
    tracker: Tracker, trace_id: str, sent_ns: int = T0, chain: int = 0, fields: Any = None
) -> FollowedSignal:
    """Follow ``trace_id`` sent at ``sent_ns`` and return its table entry."""
    tracker.follow(
        chain, trace_id, "telemetry", "VIN", sent_ns - 5 * MS, sent_ns, 7, fields or FIELDS
    )
    return tracker._tables[chain][trace_id]


def test_all_hops_in_order_is_ok_with_exact_latencies() -> None:
    """Hops seen in order give verdict ok once, with exact latency, step and chain latency."""
    tracker, rec = make()
    s = follow(tracker, tid(1))
    tracker.observe(0, 0, tid(1), T0 + 100 * MS)
    tracker.observe(0, 1, tid(1), T0 + 250 * MS)
    assert rec.verdicts == []
    tracker.observe(0, 2, tid(1), T0 + 600 * MS)

    assert rec.verdicts == [s]
    assert s.verdict is Verdict.OK and s.failed_hop is None
    assert s.results == [HopResult.OK] * 3
    assert [s.latency_s(h) for h in range(3)] == [0.1, 0.25, 0.6]
    assert [s.step_s(h) for h in range(3)] == [0.1, 0.15, 0.35]
    assert s.chain_latency_s() == 0.6
    assert s.intended_wall_ns == 7 - 5 * MS
    assert [s.counted_result(h) for h in range(3)] == ["ok", "ok", "ok"]


def test_unseen_hop_times_out_exactly_at_its_deadline() -> None:
    """An unseen hop times out when expire(now) reaches sent+within, not a nanosecond before."""
    chain = ChainSpec("c", "telemetry", (HopSpec("a", 1.0), HopSpec("b", 2.0)))
    tracker, rec = make(chain)
    s = follow(tracker, tid(1))
    tracker.observe(0, 0, tid(1), T0 + 10 * MS)

    tracker.expire(T0 + 2 * S - 1)
    assert s.results == [HopResult.OK, None] and rec.verdicts == []
    assert s.counted_result(1) == "pending"
    tracker.expire(T0 + 2 * S)
    assert s.results == [HopResult.OK, HopResult.TIMEOUT]
    assert rec.verdicts == [s] and s.verdict is Verdict.FAILED and s.failed_hop == 1
    assert s.latency_s(1) is None and s.step_s(1) is None and s.chain_latency_s() is None
    assert s.counted_result(1) == "timeout"


def test_failure_after_the_first_is_counted_as_skipped() -> None:
    """A failing hop after the chain's first failure counts as skipped but keeps its result."""
    tracker, rec = make()
    s = follow(tracker, tid(1))
    tracker.observe(0, 0, tid(1), T0 + 10 * MS)
    tracker.expire(T0 + 3 * S)

    assert s.results == [HopResult.OK, HopResult.TIMEOUT, HopResult.TIMEOUT]
    assert s.verdict is Verdict.FAILED and s.failed_hop == 1
    assert [s.counted_result(h) for h in range(3)] == ["ok", "timeout", "skipped"]
    assert rec.verdicts == [s]


def test_ok_hop_after_a_failure_stays_ok() -> None:
    """A hop seen after an earlier hop timed out is judged ok and counted ok."""
    tracker, _ = make()
    s = follow(tracker, tid(1))
    tracker.expire(T0 + 1 * S)
    tracker.observe(0, 1, tid(1), T0 + 1_500 * MS)
    tracker.observe(0, 2, tid(1), T0 + 1_600 * MS)
    assert s.results == [HopResult.TIMEOUT, HopResult.OK, HopResult.OK]
    assert [s.counted_result(h) for h in range(3)] == ["timeout", "ok", "ok"]
    assert s.failed_hop == 0
    assert s.step_s(1) is None  # the previous hop was never seen


def test_hop_seen_before_an_earlier_pending_hop_is_out_of_order() -> None:
    """A hop seen while an earlier hop is still pending is out_of_order; the chain fails there."""
    chain = ChainSpec("c", "telemetry", (HopSpec("a", 1.0), HopSpec("b", 2.0)))
    tracker, rec = make(chain)
    s = follow(tracker, tid(1))
    tracker.observe(0, 1, tid(1), T0 + 100 * MS)
    tracker.observe(0, 0, tid(1), T0 + 200 * MS)

    assert s.results == [HopResult.OK, HopResult.OUT_OF_ORDER]
    assert rec.verdicts == [s] and s.verdict is Verdict.FAILED and s.failed_hop == 1
    assert s.counted_result(1) == "out_of_order"
    assert s.latency_s(1) == 0.1


def expecting(*expectations: Expectation) -> ChainSpec:
    """A one-hop chain whose hop has ``expectations``."""
    return ChainSpec("c", "telemetry", (HopSpec("api", 1.0, expectations),))


def test_expectation_mismatch_is_invalid_with_detail() -> None:
    """A body that does not meet an expectation makes the hop invalid, with what differed."""
    chain = expecting(
        Expectation("$.vin", TextTemplate("{vin}")),
        Expectation("$.speed", TextTemplate("{speed_kmh}")),
    )
    tracker, rec = make(chain)
    s = follow(tracker, tid(1))
    tracker.observe(0, 0, tid(1), T0 + 10 * MS, {"vin": "WBA00000000000001", "speed": 51})

    assert s.results == [HopResult.INVALID]
    assert s.details == {0: "$.speed: expected 50, got 51"}
    assert rec.verdicts == [s] and s.verdict is Verdict.FAILED and s.failed_hop == 0
    assert s.counted_result(0) == "invalid"


def test_matching_expectations_are_ok() -> None:
    """A body meeting every expectation (templates with types kept, literals as-is) is ok."""
    chain = expecting(
        Expectation("$.v.id", TextTemplate("{vin}")),
        Expectation("$.speed", TextTemplate("{speed_kmh}")),
        Expectation("$.kind", "car"),
    )
    tracker, _ = make(chain)
    s = follow(tracker, tid(1))
    body = {"v": {"id": "WBA00000000000001"}, "speed": 50, "kind": "car"}
    tracker.observe(0, 0, tid(1), T0 + 10 * MS, body)
    assert s.results == [HopResult.OK] and s.details is None


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({}, "$.locked: missing (expected True)"),
        ({"locked": 1}, "$.locked: expected True, got 1"),  # a bool never equals a number
        ({"locked": "true"}, "$.locked: expected True, got 'true'"),
    ],
)
def test_expectation_detail_for_missing_and_wrong_type(body: Any, detail: str) -> None:
    """A missing path or a value of another type is invalid, and the detail says which."""
    tracker, _ = make(expecting(Expectation("$.locked", TextTemplate("{locked}"))))
    s = follow(tracker, tid(1))
    tracker.observe(0, 0, tid(1), T0 + 10 * MS, body)
    assert s.results == [HopResult.INVALID]
    assert s.details == {0: detail}


def test_unreadable_body_with_expectations_is_invalid() -> None:
    """A MISSING body at a hop with expectations is invalid ("body is not JSON")."""
    tracker, _ = make(expecting(Expectation("$.vin", TextTemplate("{vin}"))))
    s = follow(tracker, tid(1))
    tracker.observe(0, 0, tid(1), T0 + 10 * MS, MISSING)
    assert s.results == [HopResult.INVALID]
    assert s.details == {0: "body is not JSON"}


def test_unreadable_body_without_expectations_is_ok() -> None:
    """A hop without expectations does not need a readable body, and keeps no fields."""
    tracker, _ = make()
    s = follow(tracker, tid(1))
    tracker.observe(0, 0, tid(1), T0 + 10 * MS, MISSING)
    assert s.results[0] is HopResult.OK
    assert s.fields is None


def test_duplicate_sighting_is_counted_and_changes_nothing() -> None:
    """A second sighting of a hop is counted as a duplicate; result and seen time stay."""
    tracker, rec = make()
    s = follow(tracker, tid(1))
    tracker.observe(0, 0, tid(1), T0 + 10 * MS)
    tracker.observe(0, 0, tid(1), T0 + 20 * MS)
    tracker.observe(0, 0, tid(1), T0 + 30 * MS, MISSING)

    assert rec.duplicate_marks == [(0, 0), (0, 0)]
    assert s.duplicates == {0: 2}
    assert s.results[0] is HopResult.OK and s.seen_ns[0] == T0 + 10 * MS
    assert rec.unmatched_marks == []


def test_sighting_after_timeout_is_late() -> None:
    """A hop seen after it timed out is unmatched ``late`` and its result stays timeout."""
    tracker, rec = make()
    s = follow(tracker, tid(1))
    tracker.expire(T0 + 1 * S)
    tracker.observe(0, 0, tid(1), T0 + 1_200 * MS)

    assert rec.unmatched_marks == [(0, 0, LATE)]
    assert s.results[0] is HopResult.TIMEOUT and s.seen_ns[0] == 0
    assert rec.duplicate_marks == []


def test_late_sighting_of_the_last_hop_is_late() -> None:
    """A last hop seen after its deadline is unmatched ``late``, not an unknown trace id."""
    tracker, rec = make(ChainSpec("c", "telemetry", (HopSpec("broker", 1.0),)))
    follow(tracker, tid(1))
    tracker.expire(T0 + 1 * S)
    tracker.observe(0, 0, tid(1), T0 + 1_200 * MS)
    assert rec.unmatched_marks == [(0, 0, LATE)]


def test_sighting_stamped_after_the_deadline_is_not_ok() -> None:
    """A sighting whose seen time is past the hop's deadline never makes the hop ok."""
    tracker, rec = make()
    s = follow(tracker, tid(1))
    tracker.observe(0, 0, tid(1), T0 + 1_500 * MS)  # within is 1 s; expire has not run yet
    assert s.results[0] is HopResult.TIMEOUT and s.seen_ns[0] == 0
    assert rec.unmatched_marks == [(0, 0, LATE)]


def test_unknown_trace_id_is_unmatched() -> None:
    """An id that no chain follows is unmatched ``unknown_trace_id`` at the hop that saw it."""
    tracker, rec = make()
    follow(tracker, tid(1))
    tracker.observe(0, 2, tid(99), T0)
    assert rec.unmatched_marks == [(0, 2, UNKNOWN_TRACE_ID)]


def test_id_followed_by_another_chain_is_ignored() -> None:
    """An id that another chain follows is not counted as unknown by this chain's hop."""
    other = ChainSpec("status", "status", (HopSpec("broker", 1.0),))
    tracker, rec = make(THREE_HOPS, other)
    follow(tracker, tid(1), chain=1)
    tracker.observe(0, 0, tid(1), T0 + 10 * MS)
    assert rec.unmatched_marks == [] and rec.verdicts == []
    assert tracker.inflight(0) == 0 and tracker.inflight(1) == 1


def test_id_not_sampled_by_the_chain_is_ignored() -> None:
    """An id outside the chain's sample is not counted as unknown."""
    sampled = ChainSpec("c", "telemetry", (HopSpec("broker", 1.0),), sample=0.5)
    tracker, rec = make(sampled)
    skipped = next(tid(n) for n in range(100) if not sampled.follows(tid(n)))
    kept = next(tid(n) for n in range(100) if sampled.follows(tid(n)))
    tracker.observe(0, 0, skipped, T0)
    tracker.observe(0, 0, kept, T0)
    assert rec.unmatched_marks == [(0, 0, UNKNOWN_TRACE_ID)]


def test_an_id_of_another_shard_is_not_this_trackers_to_count() -> None:
    """Under sharding every shard sees every output; only its own unknown ids count."""
    recorder = Recorder()
    tracker = Tracker((THREE_HOPS,), recorder, owns=lambda trace_id: trace_id.endswith("1"))
    tracker.observe(0, 0, tid(2), T0)  # another shard's signal
    tracker.observe(0, 0, tid(1), T0)  # this shard's id, not followed
    assert recorder.unmatched_marks == [(0, 0, UNKNOWN_TRACE_ID)]


def test_only_the_tracker_that_counts_anonymous_messages_counts_them() -> None:
    """What carries no readable id is seen by every shard and counted by one of them."""
    counting, quiet = Recorder(), Recorder()
    Tracker((THREE_HOPS,), counting).unmatched(0, 1, "not_json")
    Tracker((THREE_HOPS,), quiet, counts_anonymous=False).unmatched(0, 1, "not_json")
    assert (counting.unmatched_marks, quiet.unmatched_marks) == ([(0, 1, "not_json")], [])


def test_forget_gives_no_verdict_and_no_retirement() -> None:
    """A forgotten signal leaves the table, gets no verdict, is not retired; queues skip it."""
    tracker, rec = make()
    follow(tracker, tid(1))
    kept = follow(tracker, tid(2), sent_ns=T0 + 1 * MS)
    tracker.forget(0, tid(1))
    tracker.forget(0, tid(404))  # unknown ids are fine
    assert tracker.inflight(0) == 1

    tracker.expire(T0 + 10 * S)
    assert rec.verdicts == [kept] and rec.retired_signals == [kept]
    assert tracker.idle and tracker.next_deadline_ns() is None


def test_retirement_only_at_the_last_deadline_and_once() -> None:
    """A judged signal stays in the table until its last hop's deadline, then retires once."""
    tracker, rec = make()
    s = follow(tracker, tid(1))
    for hop in range(3):
        tracker.observe(0, hop, tid(1), T0 + (hop + 1) * MS)
    assert rec.verdicts == [s]

    tracker.expire(T0 + 3 * S - 1)
    assert rec.retired_signals == [] and tracker.inflight(0) == 1
    tracker.observe(0, 2, tid(1), T0 + 2 * S)  # still known: a duplicate, not unknown
    assert rec.duplicate_marks == [(0, 2)]

    tracker.expire(T0 + 3 * S)
    tracker.expire(T0 + 100 * S)
    assert rec.retired_signals == [s] and rec.events == [("verdict", tid(1)), ("retired", tid(1))]
    assert tracker.idle


def test_next_deadline_ns() -> None:
    """next_deadline_ns is the earliest sent+within over every chain's pending queues."""
    other = ChainSpec("status", "status", (HopSpec("broker", 0.25),))
    tracker, _ = make(THREE_HOPS, other)
    assert tracker.next_deadline_ns() is None

    follow(tracker, tid(1), sent_ns=T0)
    assert tracker.next_deadline_ns() == T0 + 1 * S
    follow(tracker, tid(2), sent_ns=T0 + 500 * MS, chain=1)
    assert tracker.next_deadline_ns() == T0 + 750 * MS
    tracker.expire(T0 + 750 * MS)
    assert tracker.next_deadline_ns() == T0 + 1 * S
    tracker.expire(T0 + 1 * S)
    assert tracker.next_deadline_ns() == T0 + 2 * S
    tracker.expire(T0 + 3 * S)
    assert tracker.next_deadline_ns() is None


def test_abort_all() -> None:
    """abort_all gives unjudged signals verdict aborted, keeps given verdicts, retires all."""
    tracker, rec = make()
    done = follow(tracker, tid(1))
    for hop in range(3):
        tracker.observe(0, hop, tid(1), T0 + (hop + 1) * MS)
    partial = follow(tracker, tid(2))
    tracker.observe(0, 0, tid(2), T0 + 5 * MS)
    unseen = follow(tracker, tid(3))

    tracker.abort_all()
    assert done.verdict is Verdict.OK
    assert partial.verdict is Verdict.ABORTED and unseen.verdict is Verdict.ABORTED
    assert rec.verdicts == [done, partial, unseen]
    assert sorted(s.trace_id for s in rec.retired_signals) == [tid(1), tid(2), tid(3)]
    assert tracker.idle and tracker.next_deadline_ns() is None

    tracker.expire(T0 + 100 * S)
    assert len(rec.verdicts) == 3 and len(rec.retired_signals) == 3


def test_accounting_invariant_over_a_random_batch() -> None:
    """For 1,000 signals with random sightings: verdicts == retired == followed, each once."""
    rng = random.Random(1234)
    second = ChainSpec(
        "expects",
        "telemetry",
        (HopSpec("api", 0.5, (Expectation("$.vin", TextTemplate("{vin}")),)),),
    )
    tracker, rec = make(THREE_HOPS, second)
    last_within = {0: 3 * S, 1: S // 2}
    sent_at: dict[tuple[int, str], int] = {}

    sightings: list[tuple[int, int, int, str, Any]] = []
    followed = forgotten = 0
    for n in range(1_000):
        chain = rng.randrange(2)
        trace_id, sent = tid(n + 1), T0 + n * 7 * MS
        follow(tracker, trace_id, sent_ns=sent, chain=chain)
        if rng.random() < 0.05:
            tracker.forget(chain, trace_id)
            forgotten += 1
        else:
            followed += 1
            sent_at[chain, trace_id] = sent
        for hop in range(len(tracker.chains[chain].hops)):
            for _ in range(rng.choice((0, 1, 1, 1, 2))):  # unseen, seen, or seen twice
                body = rng.choice(({"vin": "VIN"}, {"vin": "WBA00000000000001"}, MISSING))
                seen = sent + rng.randrange(1, 4 * S)  # often after the deadline
                sightings.append((seen, chain, hop, trace_id, body))
    sightings.append((T0 + 10_000 * S, 0, 0, tid(999_999), MISSING))
    sightings.sort(key=lambda s: s[0])

    for seen, chain, hop, trace_id, body in sightings:
        tracker.expire(seen)  # the sweeper runs before every sighting
        # retired exactly when the last hop's deadline has passed: not before, not later
        before_deadline = sum(1 for (c, _), sent in sent_at.items() if sent + last_within[c] > seen)
        assert tracker.inflight(0) + tracker.inflight(1) == before_deadline
        tracker.observe(chain, hop, trace_id, seen, body)

    assert forgotten > 0 and followed == len(sent_at)
    assert len(rec.verdicts) == len(rec.retired_signals) == followed
    assert len({(s.chain_index, s.trace_id) for s in rec.retired_signals}) == followed
    assert {(s.chain_index, s.trace_id) for s in rec.verdicts} == set(sent_at)
    for s in rec.verdicts:
        assert (s.verdict is Verdict.OK) == all(r is HopResult.OK for r in s.results)
        assert rec.events.index(("verdict", s.trace_id)) < rec.events.index(("retired", s.trace_id))
    assert tracker.idle
    counts = {v: sum(s.verdict is v for s in rec.verdicts) for v in Verdict}
    assert counts[Verdict.OK] > 0 and counts[Verdict.FAILED] > 0 and counts[Verdict.ABORTED] == 0


def test_sampling_is_stable_and_close_to_the_rate() -> None:
    """ChainSpec(sample=0.25).follows is the same for an id every time and keeps ~25% of ids."""
    chain = ChainSpec("telemetry", "telemetry", (HopSpec("broker", 1.0),), sample=0.25)
    rng = random.Random(99)
    ids = [f"{rng.getrandbits(128):032x}" for _ in range(10_000)]
    picks = [chain.follows(t) for t in ids]
    assert picks == [chain.follows(t) for t in ids]
    assert picks == [
        ChainSpec("telemetry", "other", (), sample=0.25).follows(t) for t in ids
    ]  # depends on the chain's name and the id only
    assert 0.235 <= sum(picks) / len(picks) <= 0.265
    everything = ChainSpec("x", "telemetry", (HopSpec("broker", 1.0),))
    assert all(everything.follows(t) for t in ids[:100])


def test_a_hop_seen_slightly_before_its_predecessor_is_in_order() -> None:
    """Within the order tolerance, a hop seen before the previous one is still ok."""
    chain = ChainSpec("c", "telemetry", (HopSpec("state", 1.0), HopSpec("api", 2.0)))
    tracker, rec = make(chain)
    s = follow(tracker, tid(1))
    tracker.observe(0, 1, tid(1), T0 + 100 * MS)  # the API shows the state first...
    assert s.results == [None, None] and rec.verdicts == []  # ...held until the state is judged
    tracker.observe(0, 0, tid(1), T0 + 101 * MS)
    assert s.results == [HopResult.OK, HopResult.OK]
    assert rec.verdicts == [s] and s.verdict is Verdict.OK


def test_a_held_hop_is_judged_when_its_predecessor_times_out() -> None:
    """A hop seen before a predecessor that never comes keeps its own result; the chain fails
    at the predecessor."""
    chain = ChainSpec("c", "telemetry", (HopSpec("state", 1.0), HopSpec("api", 2.0)))
    tracker, rec = make(chain)
    s = follow(tracker, tid(1))
    tracker.observe(0, 1, tid(1), T0 + 100 * MS)
    assert [f.trace_id for f in tracker.pending(0, 1)] == []  # seen: not polled for again
    tracker.expire(T0 + 1 * S)
    assert s.results == [HopResult.TIMEOUT, HopResult.OK]
    assert s.failed_hop == 0 and rec.verdicts == [s]


def test_a_failed_send_after_a_sighting_keeps_the_verdict() -> None:
    """forget() leaves a signal that a hop already saw: it was sent, and keeps its one verdict."""
    tracker, rec = make(ChainSpec("c", "telemetry", (HopSpec("broker", 1.0),)))
    s = follow(tracker, tid(1))
    tracker.observe(0, 0, tid(1), T0 + 10 * MS)
    assert tracker.forget(0, tid(1)) is False
    tracker.expire(T0 + 2 * S)
    assert rec.verdicts == [s] and rec.retired_signals == [s]


def test_a_sighting_of_our_own_id_long_after_its_verdict_is_late_not_unknown() -> None:
    """Retired ids are remembered for two chain deadlines; a message of this run later than
    that is still recognised as its own (by the run's tag in the id) and counted late."""
    from fleetprobe.simulator.fleet import made_by_run, run_tag, trace_ids_for

    tag = run_tag(7, "run-a")
    ours, _ = trace_ids_for(7, "run-a", "WBA00000000000001", "telemetry", 1)
    theirs, _ = trace_ids_for(7, "run-b", "WBA00000000000001", "telemetry", 1)
    assert made_by_run(ours, tag) and not made_by_run(theirs, tag)
    chain = ChainSpec("c", "telemetry", (HopSpec("broker", 1.0),))
    rec = Recorder()
    tracker = Tracker([chain], rec, made_here=lambda t: made_by_run(t, tag))
    follow(tracker, ours)
    tracker.expire(T0 + 1 * S)
    tracker.expire(T0 + 60 * S)  # long forgotten
    tracker.observe(0, 0, ours, T0 + 60 * S)
    tracker.observe(0, 0, theirs, T0 + 60 * S)
    assert rec.unmatched_marks == [(0, 0, LATE), (0, 0, UNKNOWN_TRACE_ID)]
