"""The prober never blames the platform for its own limits: what it waits for on its own
side (a send slot, room in a socket) shows as its emission lag, never as a hop's latency."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest
from test_broker_restart import first_messages

from conftest import run_scenario_dict, scenario_dict, write_scenario
from fleetprobe.app.run import RunOptions, run_scenario
from fleetprobe.app.scenario import load_scenario
from fleetprobe.testbed.mosquitto import MosquittoProcess
from fleetprobe.transport.mqtt import BrokerTarget


async def test_held_acknowledgements_are_the_probers_wait_not_broker_timeouts(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """QoS 1 over one session whose PUBACKs a proxy holds for 3 s: the broker's 20 in-flight
    slots fill, later signals wait for a slot before they are stamped, so the broker hop
    (500 ms) times out for none of them, and the wait shows as the prober's emission lag."""
    scenario = scenario_dict(broker_url, prefix, duration="4s")
    scenario["signals"]["telemetry"]["qos"] = 1
    scenario["target"]["mqtt"].update({"pool": 1, "via": "fleet-broker"})
    scenario["faults"] = {
        "proxies": [{"name": "fleet-broker", "upstream": broker_url.removeprefix("mqtt://")}],
        "timeline": [
            {
                "name": "hold-acks",
                "kind": "mqtt_hold_acks",
                "target": "fleet-broker",
                "stream": "downstream",
                "at": "500ms",
                "for": "3s",
            }
        ],
    }
    result = await run_scenario_dict(tmp_path, scenario)
    report = result.report
    chain = report["chains"]["telemetry"]
    sent = report["signals"]["telemetry"]["sent"]
    assert sent >= 150 and report["signals"]["telemetry"]["send_errors"] == 0
    assert chain["hops"]["broker"]["results"]["timeout"] == 0
    assert chain["ok"] == chain["followed"] == sent
    # Signals waited up to the 3 s hold for a slot: the prober's lag, said as such.
    assert report["emission_lag_s"]["max"] > 1.0
    assert report["prober"]["saturated"] and "emission_lag" in report["prober"]["limits_hit"]


@pytest.mark.parametrize("objective", [False, True], ids=["no-objective", "with-objective"])
async def test_a_target_gone_for_good_exits_3(
    tmp_path: Path, prefix: str, objective: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """The broker dies mid-run and never comes back: most signals are unsent, and the run
    exits 3 (target unreachable), not 0 without objectives nor 1 with one; the summary's
    percentage counts the unsent signals."""
    broker = MosquittoProcess()
    broker.start()
    try:
        scenario = scenario_dict(broker.url, prefix, duration="3s")
        if objective:
            scenario["slo"] = [{"chain": "telemetry", "success_ratio": 0.5}]
        loaded = load_scenario(write_scenario(tmp_path / "s.yaml", scenario))
        options = RunOptions(handle_signals=False, out=sys.stdout)
        run = asyncio.create_task(run_scenario(loaded, options))
        async with asyncio.timeout(20):
            await first_messages(BrokerTarget(broker.host, broker.port), f"{prefix}/#", 5)
        await asyncio.to_thread(broker.stop)
        async with asyncio.timeout(60):
            result = await run
    finally:
        broker.stop()
    chain = result.report["chains"]["telemetry"]
    assert chain["unsent"] > chain["ok"] > 0
    assert result.exit_code == 3
    ratio = chain["ok"] / (chain["ok"] + chain["failed"] + chain["unsent"])
    assert f"ok {chain['ok']} ({100 * ratio:.2f}%)" in capsys.readouterr().out


async def test_a_broker_that_never_acknowledges_is_named(
    tmp_path: Path, broker_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """QoS 1 through a proxy that swallows every PUBACK for the whole run: report.json's
    `mqtt` counts the publishes left unacknowledged past `ack_timeout`, and the log names
    the broker. The broker hop saw them, so they count as sent and ok, not as failures."""
    scenario = scenario_dict(broker_url, prefix, duration="2s")
    scenario["signals"]["telemetry"]["qos"] = 1
    scenario["target"]["mqtt"].update({"pool": 1, "via": "fleet-broker", "ack_timeout": "1s"})
    scenario["faults"] = {
        "proxies": [{"name": "fleet-broker", "upstream": broker_url.removeprefix("mqtt://")}],
        "timeline": [
            {
                "name": "no-acks",
                "kind": "mqtt_hold_acks",
                "target": "fleet-broker",
                "stream": "downstream",
                "at": "0s",
                "for": "2s",
            }
        ],
    }
    with caplog.at_level(logging.WARNING):
        result = await run_scenario_dict(tmp_path, scenario)
    report = result.report
    assert report["mqtt"]["fleet"]["unacknowledged"] > 0
    chain = report["chains"]["telemetry"]
    assert chain["failed"] == 0 and chain["ok"] == report["signals"]["telemetry"]["sent"] > 0
    proxy_url = "mqtt://127.0.0.1:"
    assert any(
        "got no acknowledgement within 1s: the broker is not acknowledging" in r.getMessage()
        and proxy_url in r.getMessage()
        for r in caplog.records
    )
