"""A hop kind is one module: a kind that fleetprobe does not know, with an error reason of
its own, runs and reports through every output without a change outside its module."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import aiomqtt

from conftest import REPO, finish, fleetprobe, scenario_dict, scrape_until, write_scenario
from fleetprobe.testbed.mosquitto import free_ports

PLUGINS = Path(__file__).parent / "plugins"  # fleetprobe_udp_hop.py and its .dist-info


async def relay_to_udp(broker_url: str, topic: str, port: int, ready: asyncio.Event) -> None:
    """The platform of the test: every message on ``topic`` goes on as a datagram to
    127.0.0.1:``port``; the first one also comes with an oversize datagram."""
    host, broker_port = broker_url.removeprefix("mqtt://").split(":")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        async with aiomqtt.Client(host, int(broker_port)) as client:
            await client.subscribe(topic)
            ready.set()
            first = True
            async for message in client.messages:
                if first:
                    udp.sendto(b"x" * 600, ("127.0.0.1", port))
                    first = False
                udp.sendto(bytes(message.payload), ("127.0.0.1", port))  # type: ignore[arg-type]
    finally:
        udp.close()


async def test_a_plugin_hop_kind_reports_its_own_errors_in_every_output(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """The test-only `udp` kind, found through its entry point, sees every signal, and its
    `oversize` reason shows in /metrics, report.json and the summary."""
    udp_port, metrics_port = free_ports(2)
    scenario = scenario_dict(broker_url, prefix)
    scenario["chains"][0]["hops"].append(
        {"name": "relay", "within": "1s", "udp": {"port": udp_port, "max_bytes": 512}}
    )
    scenario["exporters"] = {
        "json": str(tmp_path / "report.json"),
        "prometheus": {"listen": f"127.0.0.1:{metrics_port}"},
    }
    path = write_scenario(tmp_path / "scenario.yaml", scenario)
    ready = asyncio.Event()
    relay = asyncio.create_task(
        relay_to_udp(broker_url, f"{prefix}/vehicles/+/telemetry", udp_port, ready)
    )
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        process = await fleetprobe(
            "run",
            str(path),
            cwd=tmp_path,
            env={"PYTHONPATH": os.pathsep.join([str(REPO), str(PLUGINS)])},
        )
        error_line = (
            'fleetprobe_hop_errors_total{chain="telemetry",hop="relay",reason="oversize",'
            'scenario="test"} 1.0'
        )
        exposition = await scrape_until(metrics_port, lambda text: error_line in text)
        code, out, err = await finish(process)
    finally:
        relay.cancel()
    assert error_line in exposition
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    chain = report["chains"]["telemetry"]
    relay_hop = chain["hops"]["relay"]
    assert relay_hop["errors"] == {"oversize": 1}
    assert relay_hop["results"]["ok"] == chain["followed"] == report["signals"]["telemetry"]["sent"]
    assert "errors oversize 1" in out
