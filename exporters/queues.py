"""``fleetprobe_queue_depth``, ``_capacity`` and ``_overflow_total``: every bounded queue
of the run, read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fleetprobe.core.queues import QueueState


class QueueCollector:
    """Exports the depth, bound and overflow count of each named queue."""

    def __init__(
        self,
        registry: CollectorRegistry,
        scenario: str,
        queues: Callable[[], Mapping[str, QueueState]],
    ) -> None:
        self._scenario = scenario
        self._queues = queues
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        labels = ["scenario", "queue"]
        depth = GaugeMetricFamily(
            "fleetprobe_queue_depth", "What waits in a bounded queue now.", labels=labels
        )
        capacity = GaugeMetricFamily(
            "fleetprobe_queue_capacity", "The bound of a queue.", labels=labels
        )
        overflow = CounterMetricFamily(
            "fleetprobe_queue_overflow",
            "What a full queue turned away (dropped, or not sent), by queue.",
            labels=labels,
        )
        for name, state in self._queues().items():
            values = [self._scenario, name]
            depth.add_metric(values, state.depth)
            capacity.add_metric(values, state.capacity)
            overflow.add_metric(values, state.overflowed)
        yield depth
        yield capacity
        yield overflow
