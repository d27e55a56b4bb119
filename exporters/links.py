"""``fleetprobe_mqtt_connected`` and ``fleetprobe_mqtt_reconnects_total``, read at scrape
time from the sessions' own :class:`~transport.links.LinkStats`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fleetprobe.transport.links import LinkStats


class LinkCollector:
    """Exports every role's sessions: how many are up, how often they reconnected."""

    def __init__(
        self, registry: CollectorRegistry, scenario: str, links: Callable[[], Sequence[LinkStats]]
    ) -> None:
        self._scenario = scenario
        self._links = links
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        connected = GaugeMetricFamily(
            "fleetprobe_mqtt_connected",
            "MQTT sessions connected now, by role (fleet, observer).",
            labels=["scenario", "role"],
        )
        reconnects = CounterMetricFamily(
            "fleetprobe_mqtt_reconnects",
            "MQTT sessions that connected again after losing the broker, by role.",
            labels=["scenario", "role"],
        )
        for link in self._links():
            connected.add_metric([self._scenario, link.role], link.connected)
            reconnects.add_metric([self._scenario, link.role], link.reconnects)
        yield connected
        yield reconnects
