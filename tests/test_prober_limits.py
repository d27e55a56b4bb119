"""The prober never blames the platform for its own limits: what it waits for on its own
side (a send slot, room in a socket) shows as its emission lag, never as a hop's latency."""

from __future__ import annotations

from pathlib import Path

from conftest import run_scenario_dict, scenario_dict


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
