"""Objectives decide the exit code, and CI reads them from junit.xml."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import junitparser

from conftest import scenario_dict, write_scenario
from fleetprobe.app.exit_codes import ExitCode
from fleetprobe.app.run import RunOptions, run_scenario
from fleetprobe.app.scenario import load_scenario


async def run_with_objectives(tmp_path: Path, broker_url: str, prefix: str, slo: list) -> int:
    """Run a one-hop scenario with ``slo``; return the exit code."""
    scenario = scenario_dict(broker_url, prefix, duration="1s", slo=slo)
    scenario["exporters"] = {
        "json": str(tmp_path / "report.json"),
        "junit": str(tmp_path / "junit.xml"),
    }
    loaded = load_scenario(write_scenario(tmp_path / "s.yaml", scenario))
    async with asyncio.timeout(30):
        return (await run_scenario(loaded, RunOptions(handle_signals=False))).exit_code


async def test_met_objectives_exit_0_with_passing_junit_cases(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """Objectives that hold: exit 0, one passing JUnit case each, measured values reported."""
    slo = [
        {"chain": "telemetry", "success_ratio": 0.99, "p99": "1s"},
        {"chain": "telemetry", "hop": "broker", "max": "2s"},
    ]
    assert await run_with_objectives(tmp_path, broker_url, prefix, slo) == ExitCode.OK
    suite = next(iter(junitparser.JUnitXml.fromfile(str(tmp_path / "junit.xml"))))
    cases = list(suite)
    assert [case.name for case in cases] == [
        "telemetry: success_ratio >= 0.99",
        "telemetry: p99 <= 1",
        "telemetry > broker: max <= 2",
    ]
    assert all(case.is_passed for case in cases)
    objectives = json.loads((tmp_path / "report.json").read_text())["objectives"]
    assert [o["ok"] for o in objectives] == [True, True, True]
    assert objectives[0]["measured"] == 1.0


async def test_a_failed_objective_exits_1_and_names_itself_in_junit(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """An objective that cannot hold: exit 1; its JUnit case fails with objective and measure."""
    slo = [
        {"chain": "telemetry", "success_ratio": 0.99, "p50": "5s"},
        {"chain": "telemetry", "hop": "broker", "p99": "0.001ms"},
    ]
    assert await run_with_objectives(tmp_path, broker_url, prefix, slo) == ExitCode.OBJECTIVE_FAILED
    suite = next(iter(junitparser.JUnitXml.fromfile(str(tmp_path / "junit.xml"))))
    failed = {case.name: case.result[0].message for case in suite if not case.is_passed}
    assert set(failed) == {"telemetry > broker: p99 <= 1e-06"}
    message = failed["telemetry > broker: p99 <= 1e-06"]
    assert (
        message.startswith("telemetry > broker: p99 <= 1e-06: measured 0.0")
        and "(failed)" in message
    )
    assert suite.tests == 3 and suite.failures == 1
