"""Shared fixtures: a real Mosquitto on loopback, unique topic prefixes, scenario builders."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from brokers import AmqttProcess, RabbitMqProcess, RumqttdProcess, rabbitmq_path
from fleetprobe.app.run import RunOptions, RunResult, run_scenario
from fleetprobe.app.scenario import load_scenario
from fleetprobe.testbed.mosquitto import MosquittoProcess, mosquitto_path
from fleetprobe.transport.mqtt import BrokerTarget, parse_broker_url


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``needs_tool(COMMAND, DEBIAN_PACKAGE)`` is skipped where the command is
    missing, except under ``CI=true``: there a missing tool means a broken install step of
    .ci/run, and the test fails, naming it, instead of quietly not running."""
    for mark in item.iter_markers("needs_tool"):
        command, package = mark.args
        if command == "mosquitto":
            found = mosquitto_path() is not None
        elif command == "rabbitmq-server":
            found = rabbitmq_path() is not None
        else:
            found = shutil.which(command) is not None
        if found:
            continue
        reason = f"{command} is not installed (Debian package {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: .ci/run installs it, so CI must have it", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """A Mosquitto broker for the whole session (``MQTT_TEST_URL`` may name another)."""
    if os.environ.get("MQTT_TEST_URL"):
        yield os.environ["MQTT_TEST_URL"]
        return
    with MosquittoProcess() as broker:
        yield broker.url


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitMqProcess]:
    """A RabbitMQ node with its MQTT plugin for the whole session (it takes ~13 s to boot)."""
    with RabbitMqProcess() as node:
        yield node


@pytest.fixture(scope="session")
def rumqttd() -> Iterator[RumqttdProcess]:
    """rumqttd with an MQTT 3.1.1 and an MQTT 5 listener, for the whole session."""
    with RumqttdProcess() as broker:
        yield broker


@pytest.fixture(scope="session")
def amqtt() -> Iterator[AmqttProcess]:
    """amqtt, an MQTT 3.1.1-only broker, for the whole session."""
    with AmqttProcess() as broker:
        yield broker


@pytest.fixture
def broker(broker_url: str) -> BrokerTarget:
    """The session broker as a connection target."""
    host, port, _ = parse_broker_url(broker_url)
    return BrokerTarget(host, port)


@pytest.fixture
def prefix() -> str:
    """A topic prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:10]}"


def scenario_dict(broker_url: str, prefix: str, **overrides: Any) -> dict[str, Any]:
    """A small valid scenario whose topics all live under ``prefix``."""
    scenario: dict[str, Any] = {
        "name": "test",
        "duration": "2s",
        "seed": 7,
        "target": {"mqtt": {"url": broker_url, "sessions": "pooled", "pool": 2}},
        "fleet": {
            "vehicles": 10,
            "area": {"lat": 48.78, "lon": 9.18, "radius_km": 5},
            "profiles": [{"name": "car", "signals": {"telemetry": {"every": "200ms"}}}],
        },
        "signals": {
            "telemetry": {
                "topic": f"{prefix}/vehicles/{{vin}}/telemetry",
                "qos": 0,
                "payload": {"vin": "{vin}", "trace_id": "{trace_id}", "speed_kmh": "{speed_kmh}"},
            }
        },
        "chains": [
            {
                "name": "telemetry",
                "signal": "telemetry",
                "hops": [
                    {
                        "name": "broker",
                        "mqtt": {"topic": f"{prefix}/vehicles/+/telemetry"},
                        "within": "500ms",
                    },
                ],
            }
        ],
    }
    scenario.update(overrides)
    return scenario


def write_scenario(path: Path, scenario: dict[str, Any]) -> Path:
    """Write ``scenario`` as YAML to ``path``."""
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    return path


REPO = Path(__file__).resolve().parents[1]


async def fleetprobe(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """Start ``fleetprobe ARGS`` as a subprocess."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fleetprobe",
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


async def finish(
    process: asyncio.subprocess.Process, timeout_s: float = 60
) -> tuple[int, str, str]:
    """Wait for the process; return exit code, stdout and stderr."""
    async with asyncio.timeout(timeout_s):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def scrape_until(port: int, done: Callable[[str], bool], timeout_s: float = 30) -> str:
    """Scrape ``127.0.0.1:port/metrics`` every 0.1 s, as Prometheus would, until
    ``done(exposition)``; return that exposition."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout_s):
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                    text = await response.text()
                    if done(text):
                        return text
            except aiohttp.ClientConnectionError:
                pass  # not serving yet
            await asyncio.sleep(0.1)  # polling a scrape target: there is nothing to await


async def assert_promtool_accepts(exposition: str) -> None:
    """``promtool check metrics`` finds nothing wrong with ``exposition``."""
    promtool = await asyncio.create_subprocess_exec(
        "promtool",
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(30):
        verdict, _ = await promtool.communicate(exposition.encode())
    assert promtool.returncode == 0, verdict.decode()


def mqtt_hops_of_the_testbed(prefix: str) -> list[dict[str, Any]]:
    """The testbed's three MQTT hops on ``prefix`` topics: broker, gateway, processor."""
    return [
        {"name": "broker", "within": "500ms", "mqtt": {"topic": f"{prefix}/vehicles/+/telemetry"}},
        {
            "name": "gateway",
            "within": "1s",
            "mqtt": {"topic": f"{prefix}/platform/events/+", "trace_id": "$.meta.trace_id"},
        },
        {
            "name": "processor",
            "within": "1s",
            "mqtt": {"topic": f"{prefix}/platform/state/+", "trace_id": "$.meta.trace_id"},
        },
    ]


async def run_scenario_dict(
    tmp_path: Path,
    scenario: dict[str, Any],
    timeout_s: float = 90,
    options: RunOptions | None = None,
) -> RunResult:
    """Write ``scenario`` into ``tmp_path`` and run it in this loop, bounded in time."""
    loaded = load_scenario(write_scenario(tmp_path / "scenario.yaml", scenario))
    async with asyncio.timeout(timeout_s):
        return await run_scenario(loaded, options or RunOptions(handle_signals=False))


def assert_every_signal_accounted(
    scenario: dict[str, Any], report: dict[str, Any], traces: Path
) -> None:
    """The accounting invariant: every signal sent has exactly one verdict in each chain
    that follows it (or is counted as not followed), and each verdict one line in the
    trace log."""
    lines = [json.loads(line) for line in traces.read_text().splitlines()]
    for chain in scenario["chains"]:
        assert chain.get("sample", 1.0) == 1.0, "the invariant is stated for whole chains"
        judged = report["chains"][chain["name"]]
        not_followed = sum(judged["not_followed"].values())
        sent = report["signals"][chain["signal"]]["sent"]
        assert judged["followed"] + not_followed == sent, chain["name"]
        assert judged["followed"] == sum(v for k, v in judged.items() if k in VERDICTS)
        assert judged["followed"] == sum(1 for line in lines if line["chain"] == chain["name"])
    assert len({(line["chain"], line["trace_id"]) for line in lines}) == len(lines)


VERDICTS = ("ok", "failed", "aborted", "inconclusive")


def read_traces(tmp_path: Path) -> list[dict[str, Any]]:
    """The lines of ``tmp_path/traces.jsonl``."""
    text = (tmp_path / "traces.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A TCP echo server's connection handler."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture(scope="session")
def exported_series(broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> frozenset[str]:
    """Every series name fleetprobe exports, from /metrics of one real run per session."""
    from exposition import exported_series_of_a_run  # it imports this module

    # A loop of its own: the tests' loops stay untouched, and the run happens once.
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        work_dir = tmp_path_factory.mktemp("exposition")
        return runner.run(exported_series_of_a_run(broker_url, work_dir))
