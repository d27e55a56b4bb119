"""The prober says when it is the limit: emission lag over 10 ms, or a queue overflow."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from conftest import run_scenario_dict, scenario_dict
from exporters.results import ResultBook
from exporters.saturation import SaturationWatch


def watch_over(
    book: ResultBook, queues: dict[str, tuple[int, int | None]]
) -> tuple[SaturationWatch, CollectorRegistry]:
    registry = CollectorRegistry()
    return SaturationWatch(book, lambda: queues, registry, "s"), registry


def test_a_window_with_lag_p99_over_10ms_is_saturated_and_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """2 late signals of 100 put p99 over the limit; 1 of 100 does not."""
    book = ResultBook([], [])
    watch, registry = watch_over(book, {})
    for lag in [0.001] * 99 + [0.020]:
        book.emission_lag.add(lag)
    watch.check(1.0, 1.0)
    assert registry.get_sample_value("fleetprobe_prober_saturated", {"scenario": "s"}) == 0
    for lag in [0.001] * 98 + [0.020, 0.030]:
        book.emission_lag.add(lag)
    with caplog.at_level(logging.WARNING, logger="fleetprobe"):
        watch.check(2.0, 1.0)
    assert registry.get_sample_value("fleetprobe_prober_saturated", {"scenario": "s"}) == 1
    assert "emission lag p99 20.0ms over the last 1s (limit 10.0ms) at 100 signals/s" in caplog.text
    report = watch.as_report()
    assert report["limits_hit"] == ["emission_lag"] and report["worst_lag_p99_s"] == 0.020
    assert report["windows_saturated"] == 1


def test_a_queue_overflow_is_counted_and_named_once_per_new_drop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Drops count into the metric and the report; the gauge falls back when they stop."""
    book = ResultBook([], [])
    queues = {"mqtt": (0, 100_000)}
    watch, registry = watch_over(book, queues)
    watch.check(1.0, 1.0)
    labels = {"scenario": "s", "observer": "mqtt"}
    assert registry.get_sample_value("fleetprobe_observer_dropped_total", labels) == 0
    queues["mqtt"] = (250, 100_000)
    with caplog.at_level(logging.WARNING, logger="fleetprobe"):
        watch.check(2.0, 1.0)
    assert "the mqtt observer's queue of 100,000 messages overflowed: 250 received" in caplog.text
    assert registry.get_sample_value("fleetprobe_observer_dropped_total", labels) == 250
    with caplog.at_level(logging.INFO, logger="fleetprobe"):
        for second in (3.0, 4.0, 5.0):
            assert "keeps up again" not in caplog.text  # not after fewer clean windows
            watch.check(second, 1.0)
    assert registry.get_sample_value("fleetprobe_prober_saturated", {"scenario": "s"}) == 0
    assert "the prober keeps up again (saturated from 1s to 2s of the run)" in caplog.text
    assert watch.as_report()["observer_dropped"] == {"mqtt": 250}
    assert watch.as_report()["limits_hit"] == ["mqtt_inbound_queue"]
    assert any("dropped 250 received messages" in line for line in watch.summary_lines())


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
    """50 signals/s on a quiet loop: nothing hit, nothing dropped."""
    result = await run_scenario_dict(tmp_path, scenario_dict(broker_url, prefix))
    assert result.report["prober"] == {
        "saturated": False,
        "limits_hit": [],
        "windows_saturated": 0,
        "worst_lag_p99_s": None,
        "observer_dropped": {},
    }
