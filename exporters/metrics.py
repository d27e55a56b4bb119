"""The Prometheus metrics of a run, on an injected registry.

Label sets are created up front, so a hop that has never failed still exports
``result="timeout"`` as 0 and a rate over it is defined from the first scrape. Labels only
take values from bounded sets (scenario, signal, chain, hop, result, reason), never a VIN
or a trace id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from fleetprobe.core.events import RunEvents
from fleetprobe.core.results import (
    COUNTED_RESULTS,
    SATURATED,
    UNSENT,
    FollowedSignal,
    HopResult,
    Verdict,
)
from fleetprobe.probes.chains import ChainSpec

# From 1 ms to 60 s: the span between a broker hop on loopback and a slow webhook.
LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    60.0,
)
# Emission lag is judged at 10 ms; finer buckets below it.
LAG_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0)


class ProbeMetrics(RunEvents):
    """Every fleetprobe metric of the run's events, for one scenario: a sink of the run.

    Args:
        registry: where the metrics live (a fresh one per run; never the global one).
        scenario: the scenario name, a label on every metric.
        signals: the signal kinds that will be sent.
        chains: the chains that will be followed.
        faults: the names of the scenario's faults (``fleetprobe_fault_active``).
        run_id: the run's id, the one label of ``fleetprobe_run_info`` (no other metric
            carries it: a label per run would make a new series of every metric each run).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        scenario: str,
        signals: Sequence[str],
        chains: Sequence[ChainSpec],
        faults: Sequence[str] = (),
        run_id: str = "",
    ) -> None:
        self.scenario = scenario
        self.chains = tuple(chains)
        s = scenario
        Info(
            "fleetprobe_run",
            "The run: its id (trace ids derive from it).",
            ["scenario"],
            registry=registry,
        ).labels(s).info({"run_id": run_id})
        self.signals_sent = Counter(
            "fleetprobe_signals_sent",
            "Signals handed to the MQTT client.",
            ["scenario", "signal"],
            registry=registry,
        )
        self.send_errors = Counter(
            "fleetprobe_send_errors",
            "Signals that could not be sent, by reason.",
            ["scenario", "signal", "reason"],
            registry=registry,
        )
        self.not_followed_signals = Counter(
            "fleetprobe_not_followed",
            "Signals sent that a chain did not follow, by reason (saturated: the prober "
            "could not keep up and shed its own work).",
            ["scenario", "chain", "reason"],
            registry=registry,
        )
        self.emission_lag = Histogram(
            "fleetprobe_emission_lag_seconds",
            "Actual send time minus the time the fleet model scheduled the signal.",
            ["scenario"],
            buckets=LAG_BUCKETS,
            registry=registry,
        ).labels(s)
        self.hop_results = Counter(
            "fleetprobe_hop_results",
            "Followed signals by hop and result.",
            ["scenario", "chain", "hop", "result"],
            registry=registry,
        )
        self.hop_latency = Histogram(
            "fleetprobe_hop_latency_seconds",
            "Time from the send until the hop saw the signal.",
            ["scenario", "chain", "hop"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.hop_step = Histogram(
            "fleetprobe_hop_step_seconds",
            "Time from the previous hop until this hop saw the signal.",
            ["scenario", "chain", "hop"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.chain_results = Counter(
            "fleetprobe_chain_results",
            "Chain verdicts, with the first failing hop.",
            ["scenario", "chain", "result", "failed_hop"],
            registry=registry,
        )
        self.chain_latency = Histogram(
            "fleetprobe_chain_latency_seconds",
            "Time from the send until the last hop, for chains that ended ok.",
            ["scenario", "chain"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inflight = Gauge(
            "fleetprobe_inflight_signals",
            "Followed signals waiting for their verdict.",
            ["scenario", "chain"],
            registry=registry,
        )
        self.unmatched_messages = Counter(
            "fleetprobe_unmatched",
            "Messages a hop could not match to a followed signal, by reason.",
            ["scenario", "chain", "hop", "reason"],
            registry=registry,
        )
        self.hop_errors = Counter(
            "fleetprobe_hop_errors",
            "Errors a hop's observer met on its own side (a failed poll, a refused webhook "
            "call, ...), by a reason its hop kind defines.",
            ["scenario", "chain", "hop", "reason"],
            registry=registry,
        )
        self.fault_active = Gauge(
            "fleetprobe_fault_active",
            "1 while the fault is in force.",
            ["scenario", "fault"],
            registry=registry,
        )
        for fault in faults:
            self.fault_active.labels(s, fault).set(0)
        position = Gauge(
            "fleetprobe_hop_position",
            "A hop's place in its chain (1 is the first): the order to show hops in.",
            ["scenario", "chain", "hop"],
            registry=registry,
        )
        for c in self.chains:
            for place, h in enumerate(c.hops, start=1):
                position.labels(s, c.name, h.name).set(place)
        self.duplicates = Counter(
            "fleetprobe_duplicates",
            "Signals seen again at a hop where they were already seen.",
            ["scenario", "chain", "hop"],
            registry=registry,
        )

        self._sent = {name: self.signals_sent.labels(s, name) for name in signals}
        self._results = [
            [
                {r: self.hop_results.labels(s, c.name, h.name, r) for r in COUNTED_RESULTS}
                for h in c.hops
            ]
            for c in self.chains
        ]
        self._latency = [
            [self.hop_latency.labels(s, c.name, h.name) for h in c.hops] for c in self.chains
        ]
        self._step = [
            [self.hop_step.labels(s, c.name, h.name) for h in c.hops] for c in self.chains
        ]
        self._chain_latency = [self.chain_latency.labels(s, c.name) for c in self.chains]
        self._chain_results = [
            {
                v: self.chain_results.labels(s, c.name, v.value, "")
                for v in Verdict
                if v is not Verdict.FAILED
            }
            for c in self.chains
        ]
        self._chain_failed = [
            [self.chain_results.labels(s, c.name, Verdict.FAILED.value, h.name) for h in c.hops]
            for c in self.chains
        ]
        self._chain_unsent = [self.chain_results.labels(s, c.name, UNSENT, "") for c in self.chains]
        self._not_followed = [
            self.not_followed_signals.labels(s, c.name, SATURATED) for c in self.chains
        ]
        for c in self.chains:
            for h in c.hops:
                self.duplicates.labels(s, c.name, h.name)

    def track_inflight(self, count: Callable[[int], int]) -> None:
        """Read in-flight counts at scrape time from ``count(chain_index)``."""
        for i, chain in enumerate(self.chains):
            self.inflight.labels(self.scenario, chain.name).set_function(_bind(count, i))

    def signal_sent(self, signal: str, lag_s: float | None) -> None:
        self._sent[signal].inc()
        if lag_s is not None:
            self.emission_lag.observe(lag_s)

    def not_sent(self, signal: str, reason: str, chains: Sequence[int]) -> None:
        self.send_errors.labels(self.scenario, signal, reason).inc()
        for c in chains:
            self._chain_unsent[c].inc()

    def not_followed(self, signal: str, reason: str, chains: Sequence[int]) -> None:
        for c in chains:
            if reason == SATURATED:
                self._not_followed[c].inc()
            else:
                self.not_followed_signals.labels(self.scenario, self.chains[c].name, reason).inc()

    def verdict(self, followed: FollowedSignal) -> None:
        c = followed.chain_index
        for h, result in enumerate(followed.results):
            if result is None:  # an aborted signal's unjudged hop
                continue
            self._results[c][h][followed.counted_result(h)].inc()
            if result is HopResult.OK and followed.latency_known(h):
                self._latency[c][h].observe(followed.latency_s(h) or 0.0)
                step = followed.step_s(h)
                if step is not None:
                    # Within the order tolerance a hop may be seen just before the previous
                    # one; a negative observation would make the histogram's _sum go down.
                    self._step[c][h].observe(max(0.0, step))
        verdict = followed.verdict
        if verdict is Verdict.FAILED and followed.failed_hop is not None:
            self._chain_failed[c][followed.failed_hop].inc()
        elif verdict is not None and verdict is not Verdict.FAILED:
            self._chain_results[c][verdict].inc()
        latency = followed.chain_latency_s()
        if latency is not None and not followed.uncertain:
            self._chain_latency[c].observe(latency)

    def duplicate(self, chain_index: int, hop_index: int) -> None:
        chain = self.chains[chain_index]
        self.duplicates.labels(self.scenario, chain.name, chain.hops[hop_index].name).inc()

    def unmatched(self, chain_index: int, hop_index: int, reason: str) -> None:
        self._count(self.unmatched_messages, chain_index, hop_index, reason)

    def hop_error(self, chain_index: int, hop_index: int, reason: str) -> None:
        self._count(self.hop_errors, chain_index, hop_index, reason)

    def fault_changed(self, fault: str, active: bool) -> None:
        self.fault_active.labels(self.scenario, fault).set(1 if active else 0)

    def _count(self, counter: Counter, chain_index: int, hop_index: int, reason: str) -> None:
        chain = self.chains[chain_index]
        counter.labels(self.scenario, chain.name, chain.hops[hop_index].name, reason).inc()


def export_objectives(
    registry: CollectorRegistry,
    scenario: str,
    objectives: Sequence[tuple[str, str | None, str, float]],
) -> None:
    """Export each objective ``(chain, hop, metric, value)`` of the scenario as a gauge, so
    that alert rules compare a measure with its own objective instead of a copied number.

    ``metric`` is ``success_ratio`` (a ratio) or a latency quantile ``p50`` .. ``max``
    (seconds); ``hop`` is empty for an objective on the whole chain.
    """
    gauge = Gauge(
        "fleetprobe_objective",
        "An objective of the scenario: success_ratio (ratio) or latency p50..max (seconds).",
        ["scenario", "chain", "hop", "metric"],
        registry=registry,
    )
    for chain, hop, metric, value in objectives:
        gauge.labels(scenario, chain, hop or "", metric).set(value)


def _bind(count: Callable[[int], int], index: int) -> Callable[[], float]:
    return lambda: float(count(index))
