"""Combining the expositions of shard processes into one /metrics (pure logic)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleetprobe.exporters.merged_metrics import merge_expositions


def shard_exposition(sent: int, up: int, inflight: int, latencies: list[float]) -> str:
    """One shard's metrics, with the names and kinds fleetprobe uses."""
    registry = CollectorRegistry()
    labels = {"scenario": "s", "chain": "c"}
    Counter("fleetprobe_signals_sent", "", ["scenario"], registry=registry).labels("s").inc(sent)
    hop_up = Gauge("fleetprobe_hop_up", "", ["scenario", "chain"], registry=registry)
    hop_up.labels(**labels).set(up)
    inflight_gauge = Gauge(
        "fleetprobe_inflight_signals", "", ["scenario", "chain"], registry=registry
    )
    inflight_gauge.labels(**labels).set(inflight)
    objective = Gauge("fleetprobe_objective", "", ["scenario", "chain"], registry=registry)
    objective.labels(**labels).set(0.99)
    latency = Histogram(
        "fleetprobe_chain_latency_seconds",
        "",
        ["scenario", "chain"],
        buckets=(0.1, 1.0),
        registry=registry,
    )
    for value in latencies:
        latency.labels(**labels).observe(value)
    return generate_latest(registry).decode()


def samples(exposition: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition.decode())
        for s in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted({"scenario": "s", **labels}.items()))


def test_counters_and_histograms_add_up_and_gauges_combine_by_meaning() -> None:
    first = shard_exposition(sent=10, up=1, inflight=3, latencies=[0.05, 0.5])
    second = shard_exposition(sent=5, up=0, inflight=4, latencies=[2.0])
    merged = samples(merge_expositions([first, second]))
    bucket = "fleetprobe_chain_latency_seconds_bucket"

    assert merged[key("fleetprobe_signals_sent_total")] == 15
    assert merged[key("fleetprobe_hop_up", chain="c")] == 0  # down where one shard sees it down
    assert merged[key("fleetprobe_inflight_signals", chain="c")] == 7
    assert merged[key("fleetprobe_objective", chain="c")] == 0.99  # the same in every shard
    assert merged[key(bucket, chain="c", le="0.1")] == 1
    assert merged[key(bucket, chain="c", le="1.0")] == 2
    assert merged[key(bucket, chain="c", le="+Inf")] == 3
    assert merged[key("fleetprobe_chain_latency_seconds_count", chain="c")] == 3
    assert merged[key("fleetprobe_chain_latency_seconds_sum", chain="c")] == 2.55
    created = key("fleetprobe_signals_sent_created")
    assert merged[created] == min(samples(t.encode())[created] for t in (first, second))


def test_one_exposition_passes_through_unchanged() -> None:
    text = shard_exposition(sent=3, up=1, inflight=0, latencies=[0.2])
    assert merge_expositions([text]).decode() == text
