"""ResultBook merging: the books of shards add up to the book of the whole run."""

from __future__ import annotations

import pickle

from exporters.results import ResultBook
from probes.chains import ChainSpec, FollowedSignal, HopResult, HopSpec, Verdict

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
        book.send_error("telemetry", "not_connected")
    for followed in signals:
        book.verdict(followed)
    book.duplicate(0, 1)
    book.unmatched_message(0, 0, "not_json")
    return book


def test_merged_shard_books_equal_the_book_of_all_their_signals() -> None:
    """Counts add and quantiles are computed over every sample, not averaged per shard."""
    first = [judged(1, (1, 10)), judged(2, (2, 20)), judged(3, None)]
    second = [judged(4, (3, 300)), judged(5, (4, 40))]
    whole = book_of(first + second, 7, [0.001, 0.002, 0.003, 0.004, 0.005])
    whole.duplicate(0, 1)
    whole.unmatched_message(0, 0, "not_json")

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
