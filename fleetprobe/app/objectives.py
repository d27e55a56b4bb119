"""Judge a run against the scenario's objectives, on exact per-signal values."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fleetprobe.app.scenario.models import ObjectiveConfig
from fleetprobe.exporters.results import ChainBook, ResultBook
from fleetprobe.exporters.stats import QUANTILES, Samples


@dataclass(frozen=True)
class Outcome:
    """One objective and what was measured (``measured`` is None without data)."""

    chain: str
    hop: str | None
    metric: str
    objective: float
    measured: float | None
    ok: bool

    def as_dict(self) -> dict[str, Any]:
        """The report entry."""
        return asdict(self)

    @property
    def title(self) -> str:
        """``telemetry-to-api > processor: p95 <= 0.3``."""
        where = self.chain + (f" > {self.hop}" if self.hop else "")
        relation = ">=" if self.metric == "success_ratio" else "<="
        return f"{where}: {self.metric} {relation} {self.objective:g}"

    @property
    def explanation(self) -> str:
        """What was measured against the objective, in words."""
        if self.measured is None:
            return f"{self.title}: no data (nothing was judged)"
        return f"{self.title}: measured {self.measured:.6g}" + ("" if self.ok else " (failed)")


def evaluate(objectives: list[ObjectiveConfig], book: ResultBook) -> list[Outcome]:
    """Every objective's outcome, in scenario order."""
    chains = {c.spec.name: c for c in book.chains}
    outcomes = []
    for objective in objectives:
        chain = chains[objective.chain]
        for metric, target in objective.metrics().items():
            measured = _measure(chain, objective.hop, metric)
            if measured is None:
                ok = False
            elif metric == "success_ratio":
                ok = measured >= target
            else:
                ok = measured <= target
            outcomes.append(Outcome(objective.chain, objective.hop, metric, target, measured, ok))
    return outcomes


def _measure(chain: ChainBook, hop_name: str | None, metric: str) -> float | None:
    if hop_name is None:
        ratio, samples = chain.success_ratio, chain.latency
    else:
        hop = chain.hops[[h.name for h in chain.spec.hops].index(hop_name)]
        ratio, samples = hop.success_ratio, hop.latency
    if metric == "success_ratio":
        return ratio
    return _quantile(samples, metric)


def _quantile(samples: Samples, metric: str) -> float | None:
    if metric == "max":
        return samples.quantile(1.0)
    return samples.quantile(QUANTILES[metric])
