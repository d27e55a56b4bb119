"""What the run's event fan-out costs per signal, beside hand-written calls to each sink.

Every followed signal passes the fan-out twice on its hot path (``signal_sent`` and
``verdict``). This times both with the run's real sinks (metrics, result book, health,
ledger, saturation watch), through :class:`RunEventFanout` and through direct calls to
each sink, the way the run called them before it had a fan-out. One run, side by side:

    .venv/bin/python bench/events.py [--signals 200000]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry

from fleetprobe.app.outcomes import SignalLedger
from fleetprobe.core.events import RunEventFanout, RunEvents
from fleetprobe.core.results import FollowedSignal, HopResult, Verdict
from fleetprobe.exporters.health import HealthMonitor, HealthPolicy
from fleetprobe.exporters.metrics import ProbeMetrics
from fleetprobe.exporters.results import ResultBook
from fleetprobe.exporters.saturation import SaturationWatch
from fleetprobe.probes.chains import ChainSpec, HopSpec

CHAIN = ChainSpec("c", "telemetry", (HopSpec("broker", 1.0), HopSpec("gateway", 1.0)))


def sinks() -> list[RunEvents]:
    """A fresh set of the run's sinks, as the run builds them."""
    registry = CollectorRegistry()
    return [
        ProbeMetrics(registry, "bench", ["telemetry"], [CHAIN]),
        ResultBook(["telemetry"], [CHAIN]),
        HealthMonitor([CHAIN], HealthPolicy(), registry, "bench"),
        SignalLedger(set()),
        SaturationWatch(dict, registry, "bench"),
    ]


def judged(n: int) -> FollowedSignal:
    """A signal both hops saw, judged ok."""
    followed = FollowedSignal(0, 2, f"{n:032x}", "telemetry", "VIN", 0, 1000, 1000, None)
    followed.seen_ns = [2000, 3000]
    followed.results = [HopResult.OK, HopResult.OK]
    followed.verdict = Verdict.OK
    return followed


def through_fanout(signals: list[FollowedSignal]) -> float:
    """Seconds per signal through one RunEventFanout."""
    events = RunEventFanout(sinks())
    return _time(signals, events.signal_sent, events.verdict)


def by_hand(signals: list[FollowedSignal]) -> float:
    """Seconds per signal with a hand-written call to each sink that reads the event."""
    metrics, book, health, ledger, saturation = sinks()

    def sent(signal: str, lag_s: float | None) -> None:
        metrics.signal_sent(signal, lag_s)
        book.signal_sent(signal, lag_s)
        saturation.signal_sent(signal, lag_s)

    def verdict(followed: FollowedSignal) -> None:
        metrics.verdict(followed)
        book.verdict(followed)
        health.verdict(followed)
        ledger.verdict(followed)

    return _time(signals, sent, verdict)


def _time(
    signals: list[FollowedSignal],
    sent: Callable[[str, float | None], None],
    verdict: Callable[[FollowedSignal], None],
) -> float:
    start = time.perf_counter()
    for followed in signals:
        sent("telemetry", 0.0005)
        verdict(followed)
    return (time.perf_counter() - start) / len(signals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--signals", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    signals = [judged(n) for n in range(args.signals)]
    best = {"fan-out": float("inf"), "by hand": float("inf")}
    for _ in range(args.rounds):  # alternate, keep each one's best: the machine is shared
        best["fan-out"] = min(best["fan-out"], through_fanout(signals))
        best["by hand"] = min(best["by hand"], by_hand(signals))
    print(f"sinks' hot path per followed signal, best of {args.rounds} x {args.signals:,}:")
    for name, seconds in best.items():
        print(f"  {name:<8} {seconds * 1e6:6.2f} µs")
    extra = best["fan-out"] - best["by hand"]
    print(f"  fan-out costs {extra * 1e6:+.2f} µs per signal ({extra / best['by hand']:+.1%})")


if __name__ == "__main__":
    main()
