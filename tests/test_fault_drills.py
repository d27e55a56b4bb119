"""Fault scenarios end to end: the shipped drills against the testbed, faults on an
external Toxiproxy-compatible API, and a false expectation failing the run."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from junitparser import Failure, JUnitXml

from conftest import REPO, assert_every_signal_accounted, scenario_dict, write_scenario
from fleetprobe.app.demo import run_demo
from fleetprobe.app.run import RunOptions, run_scenario
from fleetprobe.app.scenario import load_scenario
from fleetprobe.faults.api import make_app
from fleetprobe.faults.proxy import ProxySet
from fleetprobe.testbed.mosquitto import free_port
from fleetprobe.transport.mqtt import BrokerTarget
from fleetprobe.transport.servers import serve

DRILLS = sorted((REPO / "scenarios" / "drills").glob("*.yaml"))


async def run_drill(path: Path, workdir: Path) -> tuple[int, dict[str, Any]]:
    """Run a drill against the testbed, as `fleetprobe demo --scenario` does."""
    code = await run_demo(
        duration_s=None,
        metrics_listen=f"127.0.0.1:{free_port()}",
        knobs={},
        scenario=path,
    )
    return code, read_report(path, workdir)


def read_yaml(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


def read_report(scenario: Path, workdir: Path) -> dict[str, Any]:
    """The report.json a drill wrote under ``workdir/out/<name>/``."""
    name = yaml.safe_load(scenario.read_text())["name"]
    report: dict[str, Any] = json.loads((workdir / "out" / name / "report.json").read_text())
    return report


@pytest.mark.parametrize("drill", DRILLS, ids=[d.stem for d in DRILLS])
async def test_each_shipped_drill_passes(
    drill: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, report = await run_drill(drill, tmp_path)
    failed = [e["detail"] for e in report["expectations"] if not e["ok"]]
    assert code == 0, failed
    assert report["expectations"] and not failed
    for fault in report["faults"]:
        assert fault["applied_at"] and fault["reverted_at"] and not fault["errors"]
    scenario = read_yaml(drill)
    assert_every_signal_accounted(scenario, report, tmp_path / scenario["exporters"]["traces"])
    if drill.stem == "publish-loss":
        # 10% of the telemetry PUBLISH packets dropped: that share fails at the broker hop.
        loss = next(e for e in report["expectations"] if e["check"] == "fails_at")
        assert binomial_ok(round(loss["measured"] * loss["signals"]), loss["signals"], 0.1)


def test_the_drills_cover_the_faults_ci_needs() -> None:
    assert {d.stem for d in DRILLS} >= {
        "broker-latency",
        "stage-outage",
        "publish-loss",
        "reconnect-storm",
        "broker-black-hole",
    }


async def test_a_false_expectation_fails_the_run_naming_it_and_the_measure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The latency drill, expecting 300 ms more than the 200 ms it adds: exit 1."""
    drill = yaml.safe_load((REPO / "scenarios" / "drills" / "broker-latency.yaml").read_text())
    drill["expect"][0]["latency_added"] = {"min": "300ms"}
    path = tmp_path / "false.yaml"
    path.write_text(yaml.safe_dump(drill))
    monkeypatch.chdir(tmp_path)
    code, report = await run_drill(path, tmp_path)
    assert code == 1
    latency = next(e for e in report["expectations"] if e["check"] == "latency_added")
    # The median added latency: the toxic's 200 ms, and what a busy machine adds to the
    # signals during the fault more than to those outside it (rarely more than a few ms).
    assert not latency["ok"] and 0.19 <= latency["measured"] < 0.3
    junit = JUnitXml.fromfile(str(tmp_path / "out" / drill["name"] / "junit.xml"))
    failures = [
        result.message
        for suite in junit
        for case in suite
        for result in case.result
        if isinstance(result, Failure)
    ]
    assert len(failures) == 1
    assert "broker-latency > telemetry-to-gateway: latency_added at broker >= 0.3s" in failures[0]
    assert "+20" in failures[0]  # the measured +200.x ms


@pytest.fixture
async def toxiproxy_api() -> AsyncIterator[tuple[str, ProxySet]]:
    """A Toxiproxy-compatible API (fleetprobe's own) on a free port."""
    proxies = ProxySet(seed=5)
    runner, port = await serve(make_app(proxies), "127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}", proxies
    await runner.cleanup()


async def test_faults_on_a_toxiproxy_server(
    tmp_path: Path,
    broker_url: str,
    broker: BrokerTarget,
    prefix: str,
    toxiproxy_api: tuple[str, ProxySet],
) -> None:
    """backend: toxiproxy drives the server by its API and removes its proxy at the end."""
    url, server_side = toxiproxy_api
    scenario = scenario_dict(broker_url, prefix, duration="4s")
    scenario["target"]["mqtt"]["via"] = "fleet-broker"
    scenario["faults"] = {
        "backend": "toxiproxy",
        "toxiproxy": url,
        "proxies": [{"name": "fleet-broker", "upstream": f"{broker.host}:{broker.port}"}],
        "timeline": [
            {
                "name": "slow",
                "kind": "latency",
                "target": "fleet-broker",
                "stream": "upstream",
                "at": "1s",
                "for": "2s",
                "latency": 100,
            }
        ],
    }
    scenario["expect"] = [
        {
            "fault": "slow",
            "chain": "telemetry",
            "hop": "broker",
            "latency_added": {"min": "90ms", "max": "130ms"},
            "no_loss_outside": True,
        }
    ]
    scenario["exporters"] = {"json": str(tmp_path / "report.json")}
    loaded = load_scenario(write_scenario(tmp_path / "s.yaml", scenario))
    result = await run_scenario(loaded, RunOptions(handle_signals=False))
    assert result.exit_code == 0, [e.explanation for e in result.expectations]
    assert server_side.proxies == {}  # the run removed what it created
    fault = result.report["faults"][0]
    # In force for its 2 s: never less, and later only by what a busy machine adds.
    assert 1.9 <= fault["reverted_s"] - fault["applied_s"] <= 3.5


def binomial_ok(failed: int, judged: int, ratio: float) -> bool:
    """Within 4 standard deviations of ``ratio`` of ``judged``."""
    return abs(failed - judged * ratio) <= 4 * math.sqrt(judged * ratio * (1 - ratio))
