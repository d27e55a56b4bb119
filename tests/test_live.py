"""The live view: what it draws, and that it redraws in place."""

from __future__ import annotations

import io
import time

from prometheus_client import CollectorRegistry

from fleetprobe.core.events import RunEvents
from fleetprobe.core.results import FollowedSignal
from fleetprobe.exporters.health import HealthMonitor, HealthPolicy
from fleetprobe.exporters.live import LiveView
from fleetprobe.exporters.results import ResultBook
from fleetprobe.probes.chains import ChainSpec, HopSpec
from fleetprobe.probes.tracker import Tracker

CHAIN = ChainSpec("telemetry", "telemetry", (HopSpec("broker", 1.0), HopSpec("api", 2.0)))


def judged_view(interactive: bool) -> tuple[LiveView, io.StringIO]:
    """A view over 10 judged signals: 9 ok, 1 timing out at the api hop."""
    book = ResultBook(["telemetry"], [CHAIN])
    health = HealthMonitor([CHAIN], HealthPolicy(window_s=30), CollectorRegistry(), "demo")

    class Listener(RunEvents):
        def verdict(self, followed: FollowedSignal) -> None:
            book.verdict(followed)
            health.record(followed, time.monotonic_ns())

    tracker = Tracker([CHAIN], Listener())
    start = time.monotonic_ns()
    for n in range(10):
        trace_id = f"{n:032x}"
        tracker.follow(0, trace_id, "telemetry", "VIN", start, start, 0, {})
        tracker.observe(0, 0, trace_id, start + 2_000_000)
        if n:
            tracker.observe(0, 1, trace_id, start + 5_000_000)
    tracker.expire(start + 3_000_000_000)
    health.evaluate(start + 3_000_000_000)
    out = io.StringIO()
    view = LiveView(out, book, health, scenario="demo", duration_s=30, interactive=interactive)
    return view, out


def test_the_frame_shows_counts_recent_latency_and_health_per_hop() -> None:
    """Each hop row has ok and failed counts, the window's ratio, p50/p99 and up/DOWN."""
    view, _ = judged_view(interactive=True)
    view.phase = "emitting"
    frame = view.frame()
    rows = {line.split()[0]: line.split() for line in frame.splitlines()[3:5]}
    assert frame.splitlines()[0].startswith("fleetprobe demo  [")
    assert "emitting" in frame.splitlines()[0]
    assert rows["broker"][1:4] == ["10", "0", "100.0%"]
    assert rows["broker"][4] == "2.0ms" and rows["broker"][-1] == "up"
    assert rows["api"][1:4] == ["9", "1", "90.0%"] and rows["api"][-1] == "DOWN"


def test_a_redraw_moves_up_over_the_previous_frame() -> None:
    """The second draw starts by moving the cursor up over the first frame and clearing."""
    view, out = judged_view(interactive=True)
    view.draw()
    first = out.getvalue()
    view.draw()
    lines = first.count("\n")
    assert out.getvalue()[len(first) :].startswith(f"\x1b[{lines}F\x1b[J")


def test_plain_progress_line_for_ci() -> None:
    """Off a terminal the view's line says phase, sent, in flight and per-chain verdicts."""
    view, _ = judged_view(interactive=False)
    view.phase = "draining"
    assert view.progress_line().endswith("draining: sent 0, in flight 0; telemetry: ok 9 failed 1")
