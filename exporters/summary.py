"""The table printed at the end of a run: per chain and hop, results and latency."""

from __future__ import annotations

from fleetprobe.exporters.results import ChainBook, ResultBook
from fleetprobe.exporters.saturation import LAG_LIMIT_S
from fleetprobe.exporters.stats import Samples, format_ms


def render_summary(book: ResultBook, scenario: str) -> str:
    """A plain-text table of the run's results, with a warning when the prober lagged."""
    lines = [f"fleetprobe: {scenario}"]
    for name, signal in book.signals.items():
        errors = sum(signal.send_errors.values())
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(signal.send_errors.items()))
        lines.append(
            f"  signal {name}: sent {signal.sent}, send errors {errors}"
            + (f" ({reasons})" if reasons else "")
        )
    lag_p99 = book.emission_lag.quantile(0.99)
    lines.append(
        f"  emission lag: p50 {format_ms(book.emission_lag.quantile(0.5))}, "
        f"p99 {format_ms(lag_p99)}"
    )
    if lag_p99 is not None and lag_p99 > LAG_LIMIT_S:
        lines.append(
            f"  WARNING: emission lag p99 {format_ms(lag_p99)} is over "
            f"{format_ms(LAG_LIMIT_S)}: the "
            "prober could not keep the schedule, latencies include its own delay"
        )
    header = (
        f"    {'hop':<18}{'ok':>8}{'timeout':>9}{'invalid':>9}{'order':>7}{'skipped':>9}"
        f"{'p50':>10}{'p99':>10}{'step p50':>10}"
    )
    for chain in book.chains:
        followed = chain.followed
        ok = chain.verdicts["ok"]
        success = chain.success_ratio
        ratio = "-" if success is None else f"{100.0 * success:.2f}%"
        lines.append("")
        lines.append(
            f"  chain {chain.spec.name} (signal {chain.spec.signal}): followed {followed}, "
            f"ok {ok} ({ratio}), failed {chain.verdicts['failed']}"
            + (f", aborted {chain.verdicts['aborted']}" if chain.verdicts["aborted"] else "")
            + (f", unsent {chain.unsent}" if chain.unsent else "")
            + _unjudged(chain)
            + f", latency p50 {_ms_of(chain.latency, 0.5)} p99 {_ms_of(chain.latency, 0.99)}"
        )
        if chain.failed_at:
            first = ", ".join(f"{hop} {n}" for hop, n in chain.failed_at.most_common())
            lines.append(f"    broken at: {first}")
        lines.append(header)
        for spec, hop in zip(chain.spec.hops, chain.hops, strict=True):
            r = hop.results
            lines.append(
                f"    {spec.name:<18}{r['ok']:>8}{r['timeout']:>9}{r['invalid']:>9}"
                f"{r['out_of_order']:>7}{r['skipped']:>9}{_ms_of(hop.latency, 0.5):>10}"
                f"{_ms_of(hop.latency, 0.99):>10}{_ms_of(hop.step, 0.5):>10}"
            )
            extras = []
            if r["inconclusive"]:
                extras.append(f"inconclusive {r['inconclusive']}")
            if hop.duplicates:
                extras.append(f"duplicates {hop.duplicates}")
            if hop.unmatched:
                extras.append(
                    "unmatched " + ", ".join(f"{k} {v}" for k, v in sorted(hop.unmatched.items()))
                )
            if hop.errors:
                extras.append(
                    "errors " + ", ".join(f"{k} {v}" for k, v in sorted(hop.errors.items()))
                )
            if extras:
                lines.append(f"      {'; '.join(extras)}")
    return "\n".join(lines)


def _unjudged(chain: ChainBook) -> str:
    """What the prober could not judge, when it could not keep up."""
    parts = []
    if chain.verdicts["inconclusive"]:
        parts.append(f", inconclusive {chain.verdicts['inconclusive']}")
    shed = sum(chain.not_followed.values())
    if shed:
        parts.append(f", not followed {shed} (the prober could not keep up)")
    return "".join(parts)


def _ms_of(samples: Samples, q: float) -> str:
    return format_ms(samples.quantile(q))
