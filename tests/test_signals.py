"""SIGINT and SIGTERM at every stage of a run: the reports are written, the exit status
is 128 + the signal, and a second signal ends the wait at once."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest

from conftest import finish, fleetprobe, scenario_dict, write_scenario

SLOW_HOP = {"name": "never", "mqtt": {"topic": "nobody/publishes/here"}, "within": "30s"}


async def line_containing(process: asyncio.subprocess.Process, text: str) -> None:
    """Read the process's stderr until a line holds ``text``."""
    assert process.stderr is not None
    seen = []
    async with asyncio.timeout(30):
        while text not in (line := (await process.stderr.readline()).decode()):
            assert line, f"{text!r} never came; stderr: {''.join(seen)}"  # ended
            seen.append(line)


def report_of(folder: Path) -> dict:
    return json.loads((folder / "out" / "report.json").read_text())


async def test_a_signal_while_connecting_ends_the_start_and_writes_the_reports(
    tmp_path: Path, prefix: str
) -> None:
    """A broker that accepts the connection and never answers: SIGTERM during the wait
    for CONNACK ends the run at once (not after the connect timeout) with 143."""
    accepted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # until fleetprobe goes: the silence is the point
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    scenario = scenario_dict(f"mqtt://127.0.0.1:{port}", prefix)
    scenario["exporters"] = {"json": "out/report.json", "traces": "out/traces.jsonl"}
    async with server:
        process = await fleetprobe(
            "run", str(write_scenario(tmp_path / "s.yaml", scenario)), cwd=tmp_path
        )
        async with asyncio.timeout(20):
            await accepted.wait()
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code, _, err = await finish(process, 20)
    assert code == 143, err
    assert time.monotonic() - signalled < 4  # the connect timeout is 5 s
    assert "interrupted while starting: nothing was sent" in err
    report = report_of(tmp_path)
    assert report["interrupted"] is True and report["exit_code"] == 143
    assert report["signals"]["telemetry"]["sent"] == 0


@pytest.mark.parametrize("signals", [1, 2], ids=["one-signal", "two-signals"])
async def test_a_signal_during_the_drain_shortens_it(
    tmp_path: Path, broker_url: str, prefix: str, signals: int
) -> None:
    """A hop that waits 30 s for what never comes: one SIGINT in the drain ends it after
    the interrupted drain (2 s), a second at once; each signal has one verdict and one
    trace line, the hop that never answered is pending or aborted, not a timeout."""
    scenario = scenario_dict(broker_url, prefix, duration="1s")
    scenario["chains"][0]["hops"].append(SLOW_HOP)
    scenario["exporters"] = {"json": "out/report.json", "traces": "out/traces.jsonl"}
    path = write_scenario(tmp_path / "s.yaml", scenario)
    process = await fleetprobe("run", str(path), cwd=tmp_path)
    await line_containing(process, "emission ended; waiting up to 31s")
    signalled = time.monotonic()
    process.send_signal(signal.SIGINT)
    if signals == 2:
        await line_containing(process, "SIGINT: stopping emission")
        signalled = time.monotonic()  # what follows the second signal is what counts
        process.send_signal(signal.SIGINT)
    code, _, err = await finish(process, 30)
    took_s = time.monotonic() - signalled
    assert code == 130, err
    if signals == 1:
        assert 1.9 <= took_s < 8  # the interrupted drain's 2 s, not the 31 s it had left
    else:
        assert took_s < 1.9  # at once: not even the rest of the interrupted drain's 2 s
    report = report_of(tmp_path)
    chain = report["chains"]["telemetry"]
    lines = (tmp_path / "out" / "traces.jsonl").read_text().splitlines()
    assert report["interrupted"] is True
    assert (
        chain["aborted"]
        == chain["followed"]
        == len(lines)
        == report["signals"]["telemetry"]["sent"]
        > 0
    )
    assert chain["hops"]["never"]["results"]["timeout"] == 0


async def test_a_second_signal_gives_up_on_acknowledgements_that_do_not_come(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """QoS 1 through a proxy that swallows everything the broker says back: no PUBACK ever
    comes. Two SIGINTs while the run waits for them end it at once; the sends still
    waiting are send errors ``interrupted``, and every signal sent has one verdict."""
    host_port = broker_url.removeprefix("mqtt://")
    scenario = scenario_dict(broker_url, prefix, duration="1s")
    scenario["signals"]["telemetry"]["qos"] = 1
    scenario["target"]["mqtt"]["via"] = "fleet-broker"
    scenario["faults"] = {
        "proxies": [{"name": "fleet-broker", "upstream": host_port}],
        "timeline": [
            {
                "name": "no-acks",
                "kind": "timeout",
                "target": "fleet-broker",
                "stream": "downstream",
                "at": "0s",
                "for": "1s",  # faults end with the emission; the proxy stays silent
                "timeout": 0,
            }
        ],
    }
    scenario["exporters"] = {"json": "out/report.json", "traces": "out/traces.jsonl"}
    path = write_scenario(tmp_path / "s.yaml", scenario)
    process = await fleetprobe("run", str(path), cwd=tmp_path)
    await line_containing(process, "QoS 1/2 sends await their acknowledgement")
    signalled = time.monotonic()
    process.send_signal(signal.SIGINT)
    await line_containing(process, "SIGINT: stopping emission")
    process.send_signal(signal.SIGINT)
    code, _, err = await finish(process, 30)
    assert code == 130, err
    assert time.monotonic() - signalled < 5  # not the publish timeout of every send
    report = report_of(tmp_path)
    errors = report["signals"]["telemetry"]["send_errors_by_reason"]
    assert errors.get("interrupted", 0) > 0
    chain = report["chains"]["telemetry"]
    lines = (tmp_path / "out" / "traces.jsonl").read_text().splitlines()
    assert chain["followed"] == len(lines) == report["signals"]["telemetry"]["sent"]
