"""The fleetprobe command as users run it: exit codes, signals, /metrics, the demo."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import (
    assert_promtool_accepts,
    finish,
    fleetprobe,
    scenario_dict,
    scrape_until,
    write_scenario,
)
from fleetprobe.testbed.mosquitto import free_port
from fleetprobe.transport.mqtt import BrokerTarget, MqttSession


async def test_unreachable_broker_exits_3_naming_the_url(tmp_path: Path, prefix: str) -> None:
    """A broker that refuses connections: exit 3 within seconds, the message names the URL."""
    url = f"mqtt://127.0.0.1:{free_port()}"
    path = write_scenario(tmp_path / "s.yaml", scenario_dict(url, prefix))
    started = time.monotonic()
    code, _, err = await finish(await fleetprobe("run", str(path), cwd=tmp_path), 20)
    assert code == 3
    assert f"cannot connect to {url}" in err
    assert time.monotonic() - started < 15


async def test_a_broken_scenario_sends_nothing(
    tmp_path: Path, broker: BrokerTarget, broker_url: str, prefix: str
) -> None:
    """An invalid scenario exits 2 and the broker sees no message from it."""
    scenario = scenario_dict(broker_url, prefix)
    scenario["chains"][0]["signal"] = "no-such-signal"
    path = write_scenario(tmp_path / "s.yaml", scenario)
    async with MqttSession(broker, f"watch-{prefix}") as watcher:
        await watcher.subscribe([f"{prefix}/#"])
        code, _, err = await finish(await fleetprobe("run", str(path), cwd=tmp_path))
        await watcher.publish(f"{prefix}/sentinel", b"end")
        async with asyncio.timeout(5):
            first = await anext(aiter(watcher.messages()))
    assert code == 2
    assert "chains[0] (telemetry) > signal: unknown signal 'no-such-signal'" in err
    assert first.topic == f"{prefix}/sentinel"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_a_signal_stops_emission_and_still_writes_the_reports(
    tmp_path: Path, broker: BrokerTarget, broker_url: str, prefix: str, signum: int, code: int
) -> None:
    """SIGTERM/SIGINT mid-run: exit 143/130, report and traces written, every signal judged."""
    scenario = scenario_dict(broker_url, prefix, duration="60s")
    scenario["exporters"] = {"json": "out/report.json", "traces": "out/traces.jsonl"}
    path = write_scenario(tmp_path / "s.yaml", scenario)
    async with MqttSession(broker, f"watch-{prefix}") as watcher:
        await watcher.subscribe([f"{prefix}/#"])
        process = await fleetprobe("run", str(path), cwd=tmp_path)
        async with asyncio.timeout(20):  # interrupt once signals are on their way
            messages = aiter(watcher.messages())
            for _ in range(20):
                await anext(messages)
    process.send_signal(signum)
    exit_code, out, _ = await finish(process, 15)
    report = json.loads((tmp_path / "out/report.json").read_text())
    lines = (tmp_path / "out/traces.jsonl").read_text().splitlines()
    chain = report["chains"]["telemetry"]
    assert exit_code == code
    assert report["interrupted"] is True and report["exit_code"] == code
    assert chain["followed"] == len(lines) == report["signals"]["telemetry"]["sent"] > 0
    assert "fleetprobe: test" in out


@pytest.mark.needs_tool("promtool", "prometheus")
async def test_metrics_exposition_passes_promtool(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """/metrics during a run is valid for promtool and carries the documented names."""
    port = free_port()
    scenario = scenario_dict(broker_url, prefix, duration="5s")
    scenario["exporters"] = {"prometheus": {"listen": f"127.0.0.1:{port}"}}
    process = await fleetprobe(
        "run", str(write_scenario(tmp_path / "s.yaml", scenario)), cwd=tmp_path
    )
    text = await scrape_until(
        port, lambda t: "fleetprobe_hop_results_total" in t and 'result="ok"} 0.0' not in t
    )
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/healthz") as response,
    ):
        assert response.status == 200
    process.send_signal(signal.SIGTERM)
    await finish(process)
    await assert_promtool_accepts(text)
    for name in (
        "fleetprobe_signals_sent_total",
        "fleetprobe_emission_lag_seconds_bucket",
        "fleetprobe_hop_latency_seconds_bucket",
        "fleetprobe_hop_step_seconds_bucket",
        "fleetprobe_chain_results_total",
        "fleetprobe_chain_latency_seconds_bucket",
        "fleetprobe_inflight_signals",
        "fleetprobe_hop_results_total",
    ):
        assert f"\n{name}{{" in text, name
    zero_timeouts = 'hop="broker",result="timeout",scenario="test"} 0.0'
    assert f'fleetprobe_hop_results_total{{chain="telemetry",{zero_timeouts}' in text


async def test_the_demo_runs_and_prints_per_hop_results(tmp_path: Path) -> None:
    """`fleetprobe demo` starts its broker and testbed and follows every hop kind, exit 0."""
    port = free_port()
    code, out, err = await finish(
        await fleetprobe(
            "demo", "--duration", "2s", "--metrics-listen", f"127.0.0.1:{port}", cwd=tmp_path
        ),
        90,
    )
    assert code == 0, err
    assert "chain telemetry-to-api" in out and "chain door-to-broker" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("    ")}
    for hop in ("broker", "gateway", "processor", "webhook", "api"):
        assert int(rows[hop][1]) > 0 and rows[hop][2:6] == ["0", "0", "0", "0"], rows[hop]
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["chains"]["telemetry-to-api"]["failed"] == 0


async def test_a_metrics_port_in_use_is_a_clear_usage_error(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """When /metrics cannot bind, the run exits 2 before sending, naming the address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_scenario(tmp_path / "s.yaml", scenario_dict(broker_url, prefix))
        code, _, err = await finish(
            await fleetprobe(
                "run", str(path), "--metrics-listen", f"127.0.0.1:{port}", cwd=tmp_path
            )
        )
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err
    assert "Traceback" not in err
