"""Judge a run against the scenario's objectives, on exact per-signal values.

What the prober could not judge (inconclusive signals, signals it did not follow) is
unknown, never counted for or against the platform, and so is the latency of an ok hop
read while it was blind (at most what was measured): each objective is judged at both
ends of what the unknowns could make it. It is met when it
holds even at the worst end, failed when it fails even at the best, and otherwise
inconclusive: only the prober's own limits stand between the run and a verdict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fleetprobe.app.scenario.models import ObjectiveConfig
from fleetprobe.core.results import HOP_FAILED, HOP_OK, HopResult
from fleetprobe.exporters.results import ChainBook, ResultBook
from fleetprobe.exporters.stats import QUANTILES, Samples


@dataclass(frozen=True)
class Outcome:
    """One objective and what was measured (``measured`` is None without data).

    ``unjudged``: signals the measure could not include; ``bounds``: the best and the worst
    the measure could be with them (None when every signal was judged).
    """

    chain: str
    hop: str | None
    metric: str
    objective: float
    measured: float | None
    ok: bool
    inconclusive: bool = False
    unjudged: int = 0
    bounds: tuple[float | None, float | None] | None = None

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
        if self.inconclusive and self.bounds is not None:
            best, worst = self.bounds
            measured = "nothing" if self.measured is None else f"{self.measured:.6g}"
            return (
                f"{self.title}: inconclusive: measured {measured} on what the prober could "
                f"judge; the {self.unjudged:,} signals it could not (it did not keep up) "
                f"could make it anything from {_value(best)} to {_value(worst)}"
            )
        if self.measured is None:
            return f"{self.title}: no data (nothing was judged)"
        return f"{self.title}: measured {self.measured:.6g}" + ("" if self.ok else " (failed)")


def evaluate(objectives: list[ObjectiveConfig], book: ResultBook) -> list[Outcome]:
    """Every objective's outcome, in scenario order."""
    chains = {c.spec.name: c for c in book.chains}
    return [
        _judge(chains[objective.chain], objective.hop, metric, target)
        for objective in objectives
        for metric, target in objective.metrics().items()
    ]


@dataclass(frozen=True)
class _Measure:
    """What one objective is measured on: counts and latencies, and what is unknown."""

    ok: int
    failed: int
    unknown: int  # signals with no result that counts
    latency: Samples  # exact
    latency_late: Samples  # ok, read while the prober was blind: each at most that
    longest_s: float  # the most a latency of an ok signal can be


def _measure(chain: ChainBook, hop_name: str | None) -> _Measure:
    not_followed = sum(chain.not_followed.values())
    if hop_name is None:
        verdicts = chain.verdicts
        unknown = chain.unjudged
        return _Measure(
            verdicts["ok"],
            verdicts["failed"] + chain.unsent,
            unknown,
            chain.latency,
            chain.latency_late,
            max(hop.within_s for hop in chain.spec.hops),
        )
    index = [h.name for h in chain.spec.hops].index(hop_name)
    hop = chain.hops[index]
    unknown = hop.results[HopResult.INCONCLUSIVE.value] + not_followed
    return _Measure(
        sum(hop.results[r] for r in HOP_OK),
        sum(hop.results[r] for r in HOP_FAILED),
        unknown,
        hop.latency,
        hop.latency_late,
        chain.spec.hops[index].within_s,
    )


def _judge(chain: ChainBook, hop: str | None, metric: str, target: float) -> Outcome:
    m = _measure(chain, hop)
    if metric == "success_ratio":
        judged = m.ok + m.failed
        measured = m.ok / judged if judged else None
        unknown = m.unknown
        everything = judged + unknown
        best = (m.ok + unknown) / everything if everything else None
        worst = m.ok / everything if everything else None
    else:
        q = 1.0 if metric == "max" else QUANTILES[metric]
        measured = m.latency.quantile(q)
        unknown = m.unknown + len(m.latency_late)
        best = m.latency.quantile_with(q, unknown, 0.0)
        every_measure = Samples()
        for samples in (m.latency, m.latency_late):
            every_measure.extend(samples)
        worst = every_measure.quantile_with(q, m.unknown, m.longest_s)
    if not unknown:
        ok = _meets(metric, target, measured)
        return Outcome(chain.spec.name, hop, metric, target, measured, ok)
    ok, failed = _meets(metric, target, worst), not _meets(metric, target, best)
    return Outcome(
        chain.spec.name,
        hop,
        metric,
        target,
        measured,
        ok,
        inconclusive=not ok and not failed,
        unjudged=unknown,
        bounds=(best, worst),
    )


def _meets(metric: str, target: float, value: float | None) -> bool:
    if value is None:
        return False
    return value >= target if metric == "success_ratio" else value <= target


def _value(value: float | None) -> str:
    return "nothing" if value is None else f"{value:.6g}"
