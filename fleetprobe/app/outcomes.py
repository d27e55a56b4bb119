"""Judge the outcomes a scenario expects of its faults, on exact per-signal results.

The judgement uses the times at which each fault really took effect and ended (recorded
by the timeline), and the send time and result of every signal of the judged chains.
"""

from __future__ import annotations

import statistics
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, NamedTuple

from fleetprobe.app.scenario.faults import ExpectConfig
from fleetprobe.core.events import RunEvents
from fleetprobe.core.results import HOP_OK, FollowedSignal, Verdict
from fleetprobe.probes.chains import ChainSpec


class SignalRecord(NamedTuple):
    """What the outcomes need of one judged signal."""

    sent_ns: int
    failed_hop: int  # -1: the chain was ok
    hop_ok: tuple[bool, ...]
    latency_s: tuple[float | None, ...]


class SignalLedger(RunEvents):
    """The judged signals of the chains that expected outcomes look at, in send order: a
    sink of the run's verdicts."""

    def __init__(self, chain_indexes: set[int]) -> None:
        self._records: dict[int, list[SignalRecord]] = {i: [] for i in chain_indexes}

    def verdict(self, followed: FollowedSignal) -> None:
        """Keep a signal that got its verdict (aborted ones say nothing of the platform)."""
        records = self._records.get(followed.chain_index)
        if records is None or followed.verdict not in (Verdict.OK, Verdict.FAILED):
            return
        hops = range(len(followed.results))
        records.append(
            SignalRecord(
                followed.sent_ns,
                -1 if followed.failed_hop is None else followed.failed_hop,
                tuple(followed.counted_result(h) in HOP_OK for h in hops),
                tuple(followed.latency_s(h) for h in hops),
            )
        )

    def records(self, chain_index: int) -> list[SignalRecord]:
        """The chain's records sorted by send time."""
        records = self._records.get(chain_index, [])
        records.sort(key=lambda record: record.sent_ns)
        return records


@dataclass(frozen=True)
class FaultTimes:
    """When a fault really was in force (monotonic ns); ``start_ns`` None: never applied."""

    name: str
    start_ns: int | None
    end_ns: int | None
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExpectedOutcome:
    """One expected outcome and what was measured (``measured`` None: nothing to judge)."""

    fault: str
    chain: str
    hop: str | None
    check: str
    expected: str
    measured: float | None
    ok: bool
    detail: str
    signals: int | None = None
    """How many signals the measure was taken on."""
    inconclusive = False  # judged on the signals the prober could judge

    @property
    def title(self) -> str:
        """``broker-outage > telemetry-to-api: fails_at broker (ratio >= 0.9)``."""
        return f"{self.fault} > {self.chain}: {self.check} {self.expected}"

    @property
    def explanation(self) -> str:
        """What was measured against the expectation, in words."""
        return f"{self.title}: {self.detail}" + ("" if self.ok else " (failed)")

    def as_dict(self) -> dict[str, Any]:
        """The report entry."""
        return {
            "fault": self.fault,
            "chain": self.chain,
            "hop": self.hop,
            "check": self.check,
            "expected": self.expected,
            "measured": self.measured,
            "ok": self.ok,
            "detail": self.detail,
            "signals": self.signals,
        }


def judge(
    expectations: list[ExpectConfig],
    chains: tuple[ChainSpec, ...],
    ledger: SignalLedger,
    faults: dict[str, FaultTimes],
    run_end_ns: int,
) -> list[ExpectedOutcome]:
    """Every expected outcome, in scenario order."""
    index_of = {chain.name: i for i, chain in enumerate(chains)}
    outcomes = []
    for expected in expectations:
        chain_index = index_of[expected.chain]
        judge_one = _Judge(
            expected,
            chains[chain_index],
            ledger.records(chain_index),
            faults,
            run_end_ns,
        )
        outcomes.extend(judge_one.outcomes())
    return outcomes


class _Judge:
    """The outcomes of one ``expect`` entry."""

    def __init__(
        self,
        expected: ExpectConfig,
        chain: ChainSpec,
        records: list[SignalRecord],
        faults: dict[str, FaultTimes],
        run_end_ns: int,
    ) -> None:
        self.expected = expected
        self.hop_names = [hop.name for hop in chain.hops]
        self.records = records
        self.sent = [record.sent_ns for record in records]
        self.fault = faults[expected.fault]
        self.faults = faults
        self.run_end_ns = run_end_ns
        margin_s = expected.margin
        if margin_s is None:
            margin_s = max(hop.within_s for hop in chain.hops)
        self.margin_ns = round(margin_s * 1e9)

    def outcomes(self) -> list[ExpectedOutcome]:
        checks = {
            "fails_at": self._fails_at,
            "recovers_within": self._recovers_within,
            "latency_added": self._latency_added,
            "no_loss_outside": self._no_loss_outside,
            "unaffected": self._unaffected,
        }
        return [checks[key]() for key in self.expected.outcomes()]

    def _outcome(
        self,
        check: str,
        expected: str,
        measured: float | None,
        ok: bool,
        detail: str,
        signals: int | None = None,
    ) -> ExpectedOutcome:
        hop = self.expected.fails_at if check == "fails_at" else self.expected.judged_hop
        if check in ("no_loss_outside", "unaffected"):
            hop = None
        return ExpectedOutcome(
            self.expected.fault,
            self.expected.chain,
            hop,
            check,
            expected,
            measured,
            ok,
            detail,
            signals,
        )

    def _during(self) -> list[SignalRecord]:
        start, end = self.fault.start_ns, self.fault.end_ns
        if start is None:
            return []
        end = self.run_end_ns if end is None else end
        return self.records[bisect_left(self.sent, start) : bisect_left(self.sent, end)]

    def _never_applied(self, check: str, expected: str) -> ExpectedOutcome | None:
        if self.fault.start_ns is not None:
            return None
        why = "; ".join(self.fault.errors) or "the run ended before it"
        return self._outcome(check, expected, None, False, f"the fault never took effect ({why})")

    def _fails_at(self) -> ExpectedOutcome:
        hop = self.expected.fails_at
        assert hop is not None
        expected = f"{hop} (ratio >= {self.expected.min_ratio:g})"
        missing = self._never_applied("fails_at", expected)
        if missing:
            return missing
        during = self._during()
        if not during:
            return self._outcome(
                "fails_at", expected, None, False, "no signal of the chain was sent during it"
            )
        index = self.hop_names.index(hop)
        there = sum(1 for r in during if r.failed_hop == index)
        earlier = [r.failed_hop for r in during if 0 <= r.failed_hop < index]
        ratio = there / len(during)
        ok = ratio >= self.expected.min_ratio and not earlier
        detail = f"{there} of {len(during)} signals sent during it failed at {hop} ({ratio:.1%})"
        if earlier:
            first = min(earlier)
            detail += f"; {len(earlier)} failed earlier, first at {self.hop_names[first]}"
        return self._outcome("fails_at", expected, ratio, ok, detail, len(during))

    def recovery_s(self) -> float | None:
        """Seconds from the fault's end until ``hop`` was ok for good; None: never was."""
        hop = self.expected.judged_hop
        assert hop is not None
        end = self.fault.end_ns
        if end is None:
            return None
        index = self.hop_names.index(hop)
        later_starts = [
            f.start_ns for f in self.faults.values() if f.start_ns is not None and f.start_ns > end
        ]
        stop = min(later_starts, default=self.run_end_ns)
        after = self.records[bisect_left(self.sent, end) : bisect_left(self.sent, stop)]
        if not after:
            return None
        last_failure = max((i for i, r in enumerate(after) if not r.hop_ok[index]), default=-1)
        if last_failure == len(after) - 1:
            return None
        return max(0.0, (after[last_failure + 1].sent_ns - end) / 1e9)

    def _recovers_within(self) -> ExpectedOutcome:
        bound = self.expected.recovers_within
        assert bound is not None
        hop = self.expected.judged_hop
        expected = f"{hop} within {bound:g}s"
        missing = self._never_applied("recovers_within", expected)
        if missing:
            return missing
        recovery = self.recovery_s()
        if recovery is None:
            return self._outcome(
                "recovers_within",
                expected,
                None,
                False,
                f"{hop} was not ok again before the run (or the next fault) ended",
            )
        ok = recovery <= bound
        return self._outcome(
            "recovers_within", expected, recovery, ok, f"ok again {recovery:.3f}s after the end"
        )

    def _latency_added(self) -> ExpectedOutcome:
        bounds = self.expected.latency_added
        hop = self.expected.judged_hop
        assert bounds is not None and hop is not None
        parts = [f">= {bounds.min:g}s" if bounds.min is not None else ""]
        parts.append(f"<= {bounds.max:g}s" if bounds.max is not None else "")
        expected = f"at {hop} " + " and ".join(p for p in parts if p)
        missing = self._never_applied("latency_added", expected)
        if missing:
            return missing
        index = self.hop_names.index(hop)
        during = [r.latency_s[index] for r in self._during()]
        outside = [r.latency_s[index] for r in self._outside()]
        during_s = [s for s in during if s is not None]
        outside_s = [s for s in outside if s is not None]
        if not during_s or not outside_s:
            return self._outcome(
                "latency_added",
                expected,
                None,
                False,
                f"{len(during_s)} latencies during the fault, {len(outside_s)} outside it",
            )
        during_p50, outside_p50 = statistics.median(during_s), statistics.median(outside_s)
        added = during_p50 - outside_p50
        ok = (bounds.min is None or added >= bounds.min) and (
            bounds.max is None or added <= bounds.max
        )
        detail = (
            f"median {during_p50 * 1000:.1f}ms during ({len(during_s)} signals) vs "
            f"{outside_p50 * 1000:.1f}ms outside ({len(outside_s)}): +{added * 1000:.1f}ms"
        )
        return self._outcome("latency_added", expected, added, ok, detail, len(during_s))

    def _outside(self) -> list[SignalRecord]:
        """Records sent outside every fault window, with ``margin`` around each."""
        spans = []
        for fault in self.faults.values():
            if fault.start_ns is None:
                continue
            end = self.run_end_ns if fault.end_ns is None else fault.end_ns
            spans.append((fault.start_ns - self.margin_ns, end + self.margin_ns))
        return [r for r in self.records if not any(a <= r.sent_ns < b for a, b in spans)]

    def _no_loss_outside(self) -> ExpectedOutcome:
        return self._none_lost("no_loss_outside", self._outside(), "outside the faults")

    def _unaffected(self) -> ExpectedOutcome:
        missing = self._never_applied("unaffected", "0 lost")
        if missing:
            return missing
        return self._none_lost("unaffected", self._during(), "during the fault")

    def _none_lost(self, check: str, records: list[SignalRecord], when: str) -> ExpectedOutcome:
        lost = [r for r in records if r.failed_hop >= 0]
        detail = f"{len(lost)} of {len(records)} signals sent {when} failed"
        if lost:
            first = min(r.failed_hop for r in lost)
            detail += f", first at {self.hop_names[first]}"
        return self._outcome(check, "0 lost", float(len(lost)), not lost, detail, len(records))
