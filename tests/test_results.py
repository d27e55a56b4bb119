"""ResultBook merging: the books of shards add up to the book of the whole run."""

from __future__ import annotations

import pickle
import random

from fleetprobe.core.results import FollowedSignal, HopResult, Verdict
from fleetprobe.exporters.results import ResultBook
from fleetprobe.exporters.stats import Samples
from fleetprobe.probes.chains import ChainSpec, HopSpec

CHAIN = ChainSpec("c", "telemetry", (HopSpec("broker", 1.0), HopSpec("api", 2.0)))
S = 1_000_000_000


def judged(n: int, latencies_ms: tuple[int, int] | None) -> FollowedSignal:
    """A judged signal: ok with the given hop latencies, or failed at the api hop."""
    followed = FollowedSignal(0, 2, f"{n:032x}", "telemetry", "VIN", S, S, S, None)
    if latencies_ms is None:
        followed.seen_ns[0] = S + 1_000_000
        followed.results = [HopResult.OK, HopResult.TIMEOUT]
        followed.verdict, followed.failed_hop = Verdict.FAILED, 1
    else:
        followed.seen_ns = [S + ms * 1_000_000 for ms in latencies_ms]
        followed.results = [HopResult.OK, HopResult.OK]
        followed.verdict = Verdict.OK
    return followed


def book_of(signals: list[FollowedSignal], sent: int, lags: list[float]) -> ResultBook:
    book = ResultBook(["telemetry"], [CHAIN])
    for lag in lags:
        book.signal_sent("telemetry", lag)
    for _ in range(sent - len(lags)):
        book.not_sent("telemetry", "not_connected", [])
    for followed in signals:
        book.verdict(followed)
    book.duplicate(0, 1)
    book.unmatched(0, 0, "not_json")
    return book


def test_merged_shard_books_equal_the_book_of_all_their_signals() -> None:
    """Counts add and quantiles are computed over every sample, not averaged per shard."""
    first = [judged(1, (1, 10)), judged(2, (2, 20)), judged(3, None)]
    second = [judged(4, (3, 300)), judged(5, (4, 40))]
    whole = book_of(first + second, 7, [0.001, 0.002, 0.003, 0.004, 0.005])
    whole.duplicate(0, 1)
    whole.unmatched(0, 0, "not_json")

    merged = book_of(first, 4, [0.001, 0.002, 0.003])
    # A shard's book crosses a process boundary pickled.
    merged.merge(pickle.loads(pickle.dumps(book_of(second, 3, [0.004, 0.005]))))

    chain, whole_chain = merged.chains[0], whole.chains[0]
    assert chain.verdicts == whole_chain.verdicts == {"ok": 4, "failed": 1}
    assert chain.failed_at == {"api": 1}
    assert chain.latency.summary() == whole_chain.latency.summary()
    assert chain.latency.quantile(0.99) == 0.3  # the slow signal of the second shard
    for hop, whole_hop in zip(chain.hops, whole_chain.hops, strict=True):
        assert hop.results == whole_hop.results
        assert hop.latency.summary() == whole_hop.latency.summary()
        assert hop.step.summary() == whole_hop.step.summary()
        assert (hop.duplicates, hop.unmatched) == (whole_hop.duplicates, whole_hop.unmatched)
    assert merged.signals["telemetry"].sent == 5
    assert merged.signals["telemetry"].send_errors == {"not_connected": 2}
    assert merged.emission_lag.summary() == whole.emission_lag.summary()


def test_a_long_run_keeps_a_bounded_uniform_sample_with_exact_count_and_max() -> None:
    """Past its limit a Samples keeps that many values, chosen uniformly: quantiles stay
    close, count and max exact; merged bounded samples are bounded and uniform too."""
    rng = random.Random(1)
    values = [rng.random() for _ in range(100_000)]
    samples = Samples(limit=5_000)
    for value in values:
        samples.add(value)
    assert len(samples) == 100_000 and not samples.exact
    assert samples.summary()["max"] == round(max(values), 6)
    for q in (0.5, 0.9, 0.99):
        estimate = samples.quantile(q)
        assert estimate is not None and abs(estimate - q) < 0.02  # uniform values: p = q

    low, high = Samples(limit=5_000), Samples(limit=5_000)
    for value in values[:20_000]:
        low.add(value / 2)  # 20,000 values in [0, 0.5)
    for value in values[20_000:]:
        high.add(0.5 + value / 2)  # 80,000 in [0.5, 1)
    low.extend(high)
    assert len(low) == 100_000 and len(low._values) <= 5_000
    p20 = low.quantile(0.2)
    assert p20 is not None and abs(p20 - 0.5) < 0.02  # a fifth of all values lie below 0.5


def test_short_samples_stay_exact() -> None:
    samples = Samples(limit=10)
    for value in (3.0, 1.0, 2.0):
        samples.add(value)
    other = Samples(limit=10)
    other.add(4.0)
    samples.extend(other)
    assert samples.exact and len(samples) == 4
    assert samples.quantile(0.5) == 2.0 and samples.summary()["max"] == 4.0
