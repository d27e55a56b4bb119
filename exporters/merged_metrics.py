"""One /metrics for several shard processes: their expositions, combined sample by sample.

Shards carry no shard label (Prometheus sums shards itself past one machine), so the
combination is the one a ``sum by`` over the shards would give: counters and histograms
add up. Gauges are not all sums: a hop is up only where every shard sees it up, and an
objective or a fault's state is the same number in every shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

Combine = Callable[[float, float], float]

SUMMED_GAUGES = frozenset(
    {
        "fleetprobe_inflight_signals",
        "fleetprobe_mqtt_connected",
        "fleetprobe_queue_depth",
        "fleetprobe_queue_capacity",
    }
)
LOWEST_GAUGES = frozenset({"fleetprobe_hop_up"})


def merge_expositions(texts: Sequence[str]) -> bytes:
    """The exposition of all ``texts`` (Prometheus text format) combined into one."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            combine = _combiner(family)
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sample.labels.items()))
                seen = samples.get(key)
                samples[key] = sample.value if seen is None else combine(seen, sample.value)
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merged.values()))
    return generate_latest(registry)


def _combiner(family: Metric) -> Combine:
    if family.name.endswith("_created"):
        return min  # the series exists since the first shard created it
    if family.type in ("counter", "histogram", "summary") or family.name in SUMMED_GAUGES:
        return _add
    if family.name in LOWEST_GAUGES:
        return min
    return max


def _add(a: float, b: float) -> float:
    return a + b


class _Families:
    """A collector that yields families already built."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> list[Metric]:
        return self._families
