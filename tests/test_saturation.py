"""The prober says when it is the limit: emission lag over 10 ms, or a queue overflow."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from conftest import assert_every_signal_accounted, run_scenario_dict, scenario_dict
from fleetprobe.app.run import RunOptions
from fleetprobe.core.queues import QueueState
from fleetprobe.exporters.saturation import SaturationWatch

NOW_NS = [0]
"""The watch's clock in these tests: set by hand."""


def watch_over(queues: dict[str, QueueState]) -> tuple[SaturationWatch, CollectorRegistry]:
    registry = CollectorRegistry()
    watch = SaturationWatch(lambda: queues, registry, "s", clock=lambda: NOW_NS[0])
    watch.begin(0)
    return watch, registry


def sent_at(watch: SaturationWatch, at_s: float, lags: list[float]) -> None:
    """Signals handed over at ``at_s`` of the run, each ``lag`` late."""
    NOW_NS[0] = round(at_s * 1e9)
    for lag in lags:
        watch.signal_sent("t", lag)


def test_a_window_with_lag_p99_over_10ms_is_saturated_and_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """2 late signals of 100 put p99 over the limit; 1 of 100 does not."""
    watch, registry = watch_over({})
    sent_at(watch, 0.5, [0.001] * 99 + [0.020])
    watch.check(1.0, 1.0)
    assert registry.get_sample_value("fleetprobe_prober_saturated", {"scenario": "s"}) == 0
    sent_at(watch, 1.5, [0.001] * 98 + [0.020, 0.030])
    with caplog.at_level(logging.WARNING, logger="fleetprobe"):
        watch.check(2.0, 1.0)
    assert registry.get_sample_value("fleetprobe_prober_saturated", {"scenario": "s"}) == 1
    assert "emission lag p99 20.0ms in second 1 of the run (limit 10.0ms);" in (caplog.text)
    report = watch.as_report()
    assert report["limits_hit"] == ["emission_lag"] and report["worst_lag_p99_s"] == 0.020
    assert report["windows_saturated"] == 1


def test_every_saturated_second_counts_however_late_the_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A loop held up for 5 s checks once: the 5 seconds whose signals went out late each
    count, and the rate is that of a second, not of the whole backlog."""
    watch, _ = watch_over({})
    for second in range(5):
        sent_at(watch, second + 0.6, [0.5] * 1_000)  # each due 0.5 s earlier, in `second`
    with caplog.at_level(logging.WARNING, logger="fleetprobe"):
        watch.check(5.0, 1.0)
    assert watch.as_report()["windows_saturated"] == 5
    assert "in 5 seconds of the run (limit 10.0ms);" in caplog.text


def test_a_queue_overflow_is_named_once_per_new_drop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """New overflows make the window saturated and are reported; the gauge falls back
    after three clean windows."""
    queues = {"mqtt_observer": QueueState(0, 100_000)}
    watch, registry = watch_over(queues)
    watch.check(1.0, 1.0)
    assert registry.get_sample_value("fleetprobe_prober_saturated", {"scenario": "s"}) == 0
    queues["mqtt_observer"] = QueueState(100_000, 100_000, 250)
    with caplog.at_level(logging.WARNING, logger="fleetprobe"):
        watch.check(2.0, 1.0)
    assert (
        "the mqtt_observer queue (capacity 100,000) overflowed 250 times in the last 1s: "
        "received messages dropped" in caplog.text
    )
    assert registry.get_sample_value("fleetprobe_prober_saturated", {"scenario": "s"}) == 1
    with caplog.at_level(logging.INFO, logger="fleetprobe"):
        for second in (3.0, 4.0, 5.0):
            assert "keeps up again" not in caplog.text  # not after fewer clean windows
            watch.check(second, 1.0)
    assert registry.get_sample_value("fleetprobe_prober_saturated", {"scenario": "s"}) == 0
    assert "the prober keeps up again (saturated from 1s to 2s of the run)" in caplog.text
    assert watch.as_report()["queue_overflowed"] == {"mqtt_observer": 250}
    assert watch.as_report()["limits_hit"] == ["mqtt_observer_queue"]
    assert any("overflowed 250 times: received messages" in line for line in watch.summary_lines())


async def test_a_stalled_prober_says_so_during_the_run_and_in_the_report(
    tmp_path: Path, broker_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Something else hogging the prober's event loop (40 ms in every 100 ms) is reported as
    the prober's saturation while the run lasts, not passed off as platform latency."""
    scenario = scenario_dict(broker_url, prefix, duration="3s")
    scenario["fleet"]["profiles"][0]["signals"]["telemetry"] = {"every": "20ms"}

    async def hog() -> None:
        while True:
            busy_until = time.monotonic() + 0.04  # a CPU hog on the loop: the fault itself
            while time.monotonic() < busy_until:
                pass
            await asyncio.sleep(0.06)

    hogging = asyncio.create_task(hog())
    try:
        with caplog.at_level(logging.WARNING, logger="fleetprobe"):
            result = await run_scenario_dict(tmp_path, scenario)
    finally:
        hogging.cancel()
    prober = result.report["prober"]
    assert prober["saturated"] and "emission_lag" in prober["limits_hit"]
    assert prober["worst_lag_p99_s"] > 0.010
    warnings = [r.getMessage() for r in caplog.records if "prober is saturated" in r.getMessage()]
    assert warnings and "emission lag p99" in warnings[0]


async def test_a_prober_that_keeps_up_reports_no_saturation(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """50 signals/s: no queue overflows, and the lag limit is named only when measured over.

    On a quiet machine nothing is hit at all. On one whose cores are all busy the loop may
    really run more than 10 ms late in a second: then the report must say so with the
    measured lag, never a limit it did not measure.
    """
    result = await run_scenario_dict(tmp_path, scenario_dict(broker_url, prefix))
    prober = result.report["prober"]
    assert prober["queue_overflowed"] == {}
    assert prober["limits_hit"] in ([], ["emission_lag"])
    assert prober["saturated"] == bool(prober["limits_hit"])
    if prober["limits_hit"]:
        assert prober["windows_saturated"] >= 1 and prober["worst_lag_p99_s"] > 0.010
    else:
        assert prober["windows_saturated"] == 0 and prober["worst_lag_p99_s"] is None


async def test_a_full_tracker_stops_sending_and_every_bound_is_exported(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """With room for 5 signals in flight, the rest are not sent (send errors tracker_full),
    the accounting still holds, and every queue's depth, bound and overflow is exported."""
    scenario = scenario_dict(broker_url, prefix, duration="2s")
    scenario["exporters"] = {"traces": str(tmp_path / "traces.jsonl")}
    registry = CollectorRegistry()
    options = RunOptions(handle_signals=False, registry=registry, tracker_capacity=5)
    result = await run_scenario_dict(tmp_path, scenario, options=options)

    errors = result.report["signals"]["telemetry"]["send_errors_by_reason"]
    assert errors["tracker_full"] > 0
    assert "tracker_queue" in result.report["prober"]["limits_hit"]
    assert result.report["prober"]["queue_overflowed"]["tracker"] == errors["tracker_full"]
    assert_every_signal_accounted(scenario, result.report, tmp_path / "traces.jsonl")

    def sample(name: str, queue: str) -> float | None:
        return registry.get_sample_value(name, {"scenario": "test", "queue": queue})

    assert sample("fleetprobe_queue_overflow_total", "tracker") == errors["tracker_full"]
    assert sample("fleetprobe_queue_capacity", "tracker") == 5
    for queue, capacity in (("mqtt_observer", 100_000), ("qos_acks", 1000)):
        assert sample("fleetprobe_queue_capacity", queue) == capacity
        assert sample("fleetprobe_queue_overflow_total", queue) == 0
    assert sample("fleetprobe_queue_depth", "reconnect_wait") == 0
