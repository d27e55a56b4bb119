"""Exact per-run results: counts and every latency, for the report, summary and objectives."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from fleetprobe.core.events import RunEvents
from fleetprobe.core.results import (
    FollowedSignal,
    HopResult,
    Verdict,
    chain_success_ratio,
    hop_success_ratio,
)
from fleetprobe.exporters.stats import Samples
from fleetprobe.probes.chains import ChainSpec


@dataclass
class HopBook:
    """What happened at one hop."""

    results: Counter[str] = field(default_factory=Counter)
    latency: Samples = field(default_factory=Samples)
    step: Samples = field(default_factory=Samples)
    duplicates: int = 0
    unmatched: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # the hop kind's own, by reason
    latency_late: Samples = field(default_factory=Samples)
    """Latencies of ok sightings read while the prober was blind: each at most that."""

    @property
    def success_ratio(self) -> float | None:
        """ok / (ok + failed): :func:`~fleetprobe.core.results.hop_success_ratio`."""
        return hop_success_ratio(self.results)

    def merge(self, other: HopBook) -> None:
        """Add what ``other`` recorded (the same hop, seen by another shard)."""
        self.results.update(other.results)
        self.latency.extend(other.latency)
        self.step.extend(other.step)
        self.duplicates += other.duplicates
        self.unmatched.update(other.unmatched)
        self.errors.update(other.errors)
        self.latency_late.extend(other.latency_late)


@dataclass
class ChainBook:
    """What happened to one chain's signals."""

    spec: ChainSpec
    verdicts: Counter[str] = field(default_factory=Counter)
    failed_at: Counter[str] = field(default_factory=Counter)
    latency: Samples = field(default_factory=Samples)
    hops: list[HopBook] = field(default_factory=list)
    unsent: int = 0  # signals this chain would have followed, had their send not failed
    not_followed: Counter[str] = field(default_factory=Counter)  # sent, by why not followed
    latency_late: Samples = field(default_factory=Samples)  # ok, a hop read while blind

    @property
    def followed(self) -> int:
        """Signals judged (every followed signal is judged once)."""
        return sum(self.verdicts.values())

    @property
    def success_ratio(self) -> float | None:
        """ok / (ok + failed + unsent): :func:`~fleetprobe.core.results.chain_success_ratio`."""
        return chain_success_ratio(self.verdicts["ok"], self.verdicts["failed"], self.unsent)

    @property
    def unjudged(self) -> int:
        """Signals whose fate the prober could not tell: inconclusive or not followed."""
        return self.verdicts[Verdict.INCONCLUSIVE.value] + sum(self.not_followed.values())

    def merge(self, other: ChainBook) -> None:
        """Add what ``other`` recorded (the same chain, followed by another shard)."""
        self.verdicts.update(other.verdicts)
        self.failed_at.update(other.failed_at)
        self.latency.extend(other.latency)
        for hop, theirs in zip(self.hops, other.hops, strict=True):
            hop.merge(theirs)
        self.unsent += other.unsent
        self.not_followed.update(other.not_followed)
        self.latency_late.extend(other.latency_late)


@dataclass
class SignalBook:
    """What happened when sending one signal kind."""

    sent: int = 0
    send_errors: Counter[str] = field(default_factory=Counter)


class ResultBook(RunEvents):
    """Records every verdict and latency of a run, exactly: a sink of the run's events."""

    def __init__(self, signals: Sequence[str], chains: Sequence[ChainSpec]) -> None:
        self.signals = {name: SignalBook() for name in signals}
        self.chains = [ChainBook(c, hops=[HopBook() for _ in c.hops]) for c in chains]
        self.emission_lag = Samples()

    def merge(self, other: ResultBook) -> None:
        """Add every count and latency of ``other``, a book of the same scenario kept by
        another shard, so that quantiles and objectives are those of the whole fleet."""
        for name, theirs in other.signals.items():
            mine = self.signals[name]
            mine.sent += theirs.sent
            mine.send_errors.update(theirs.send_errors)
        for chain, theirs_chain in zip(self.chains, other.chains, strict=True):
            chain.merge(theirs_chain)
        self.emission_lag.extend(other.emission_lag)

    def signal_sent(self, signal: str, lag_s: float | None) -> None:
        self.signals[signal].sent += 1
        if lag_s is not None:
            self.emission_lag.add(lag_s)

    def not_sent(self, signal: str, reason: str, chains: Sequence[int]) -> None:
        self.signals[signal].send_errors[reason] += 1
        for c in chains:
            self.chains[c].unsent += 1

    def not_followed(self, signal: str, reason: str, chains: Sequence[int]) -> None:
        for c in chains:
            self.chains[c].not_followed[reason] += 1

    def verdict(self, followed: FollowedSignal) -> None:
        book = self.chains[followed.chain_index]
        assert followed.verdict is not None
        book.verdicts[followed.verdict.value] += 1
        if followed.verdict is Verdict.FAILED and followed.failed_hop is not None:
            book.failed_at[book.spec.hops[followed.failed_hop].name] += 1
        latency = followed.chain_latency_s()
        if latency is not None:
            (book.latency_late if followed.uncertain else book.latency).add(latency)
        for h, result in enumerate(followed.results):
            if result is None:
                continue
            hop = book.hops[h]
            hop.results[followed.counted_result(h)] += 1
            if result is HopResult.OK and not followed.latency_known(h):
                hop.latency_late.add(followed.latency_s(h) or 0.0)
            elif result is HopResult.OK:
                hop.latency.add(followed.latency_s(h) or 0.0)
                step = followed.step_s(h)
                if step is not None:
                    hop.step.add(step)

    def duplicate(self, chain_index: int, hop_index: int) -> None:
        self.chains[chain_index].hops[hop_index].duplicates += 1

    def unmatched(self, chain_index: int, hop_index: int, reason: str) -> None:
        self.chains[chain_index].hops[hop_index].unmatched[reason] += 1

    def hop_error(self, chain_index: int, hop_index: int, reason: str) -> None:
        self.chains[chain_index].hops[hop_index].errors[reason] += 1
