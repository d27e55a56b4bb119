"""End-to-end runs against a real Mosquitto on loopback, with the testbed gateway."""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from conftest import read_traces, run_scenario_dict, scenario_dict
from fleetprobe.app.run import RunOptions
from fleetprobe.testbed.gateway import Gateway
from fleetprobe.testbed.knobs import StageKnobs
from fleetprobe.transport.mqtt import BrokerTarget, MqttSession


def gateway_chain(prefix: str, **hop: Any) -> dict[str, Any]:
    """A chain through the broker and the testbed gateway."""
    return {
        "name": "through-gateway",
        "signal": "telemetry",
        "hops": [
            {
                "name": "broker",
                "mqtt": {"topic": f"{prefix}/vehicles/+/telemetry"},
                "within": "500ms",
            },
            {
                "name": "gateway",
                "within": "2s",
                "mqtt": {"topic": f"{prefix}/events/+", "trace_id": "$.meta.trace_id"},
                **hop,
            },
        ],
    }


def with_outputs(scenario: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """Point every report of ``scenario`` into ``tmp_path``."""
    scenario["exporters"] = {
        "json": str(tmp_path / "report.json"),
        "traces": str(tmp_path / "traces.jsonl"),
        "junit": str(tmp_path / "junit.xml"),
    }
    return scenario


@asynccontextmanager
async def gateway(broker: BrokerTarget, prefix: str, **knobs: float) -> AsyncIterator[Gateway]:
    """The testbed gateway from ``prefix/vehicles/+/telemetry`` to ``prefix/events/{vin}``."""
    gw = Gateway(
        broker,
        StageKnobs(**knobs),
        input_filter=f"{prefix}/vehicles/+/telemetry",
        output_topic=f"{prefix}/events/{{vin}}",
        seed=1,
    )
    task = asyncio.create_task(gw.run())
    try:
        async with asyncio.timeout(10):
            await gw.wait_ready()
        yield gw
    finally:
        task.cancel()


async def test_every_followed_signal_gets_one_verdict_and_one_trace_line(
    tmp_path: Path, broker_url: str, broker: BrokerTarget, prefix: str
) -> None:
    """Accounting: sent = followed = verdicts = trace lines, all hops ok, nothing pending."""
    scenario = with_outputs(
        scenario_dict(broker_url, prefix, chains=[gateway_chain(prefix)]), tmp_path
    )
    async with gateway(broker, prefix):
        result = await run_scenario_dict(tmp_path, scenario)
    report = json.loads((tmp_path / "report.json").read_text())
    chain = report["chains"]["through-gateway"]
    sent = report["signals"]["telemetry"]["sent"]
    lines = read_traces(tmp_path)
    assert result.exit_code == 0
    assert sent >= 90  # 10 vehicles, every 200 ms, for 2 s
    assert chain["followed"] == sent == len(lines) == chain["ok"]
    assert len({line["trace_id"] for line in lines}) == sent
    assert all(line["verdict"] == "ok" and line["failed_hop"] is None for line in lines)
    for line in lines:
        broker_hop, gateway_hop = line["hops"]["broker"], line["hops"]["gateway"]
        assert broker_hop["result"] == gateway_hop["result"] == "ok"
        assert broker_hop["step_s"] == broker_hop["latency_s"]
        assert (
            abs(gateway_hop["latency_s"] - broker_hop["latency_s"] - gateway_hop["step_s"]) < 1e-6
        )
    assert chain["hops"]["gateway"]["results"]["ok"] == sent
    assert set(lines[0]) == {
        "trace_id",
        "run_id",
        "chain",
        "signal",
        "vin",
        "intended_at",
        "sent_at",
        "verdict",
        "failed_hop",
        "hops",
    }


async def test_a_silent_hop_times_out_for_every_signal_at_that_hop(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """A hop whose topic never gets a message: every chain fails there, with timeout."""
    chain = gateway_chain(prefix)  # no gateway runs, so the second hop sees nothing
    scenario = with_outputs(scenario_dict(broker_url, prefix, chains=[chain]), tmp_path)
    result = await run_scenario_dict(tmp_path, scenario)
    lines = read_traces(tmp_path)
    assert lines and all(line["failed_hop"] == "gateway" for line in lines)
    assert all(line["hops"]["gateway"] == {"result": "timeout"} for line in lines)
    assert all(line["hops"]["broker"]["result"] == "ok" for line in lines)
    assert result.report["chains"]["through-gateway"]["failed_at"] == {"gateway": len(lines)}


async def test_gateway_delay_shows_as_the_step_latency_of_its_hop(
    tmp_path: Path, broker_url: str, broker: BrokerTarget, prefix: str
) -> None:
    """With the gateway adding 100 ms, the gateway hop's median step is 100 ms, not more than
    a busy machine adds; the broker hop's is not."""
    scenario = with_outputs(
        scenario_dict(broker_url, prefix, chains=[gateway_chain(prefix)]), tmp_path
    )
    async with gateway(broker, prefix, delay_s=0.100):
        await run_scenario_dict(tmp_path, scenario)
    lines = read_traces(tmp_path)
    steps = [line["hops"]["gateway"]["step_s"] for line in lines]
    assert len(steps) >= 90
    # The gateway holds each message 100 ms after the broker hop saw it (less the moment
    # between the observer's and the gateway's receipt); the median shows it within 5 ms
    # on a quiet machine, and within 50 ms on one whose cores are all busy.
    assert 0.095 <= statistics.median(steps) <= 0.150
    broker_latency = statistics.median(line["hops"]["broker"]["latency_s"] for line in lines)
    assert broker_latency < statistics.median(steps) - 0.05


async def test_expectations_mark_a_changed_value_invalid(
    tmp_path: Path, broker_url: str, broker: BrokerTarget, prefix: str
) -> None:
    """An expect that the platform does not meet makes the hop invalid, with a detail."""
    chain = gateway_chain(prefix, expect={"$.vin": "{vin}", "$.speed_kmh": "{vin}"})
    scenario = with_outputs(scenario_dict(broker_url, prefix, chains=[chain]), tmp_path)
    async with gateway(broker, prefix):
        await run_scenario_dict(tmp_path, scenario)
    lines = read_traces(tmp_path)
    assert lines and all(line["hops"]["gateway"]["result"] == "invalid" for line in lines)
    assert lines[0]["hops"]["gateway"]["detail"].startswith("$.speed_kmh: expected '")


async def test_malformed_downstream_messages_are_counted_not_fatal(
    tmp_path: Path, broker_url: str, broker: BrokerTarget, prefix: str
) -> None:
    """Non-JSON, id-less, badly shaped and unknown ids are counted by reason; the run ends."""
    junk = [
        b"\xff not json",
        b'{"meta": {}}',
        b'{"meta": {"trace_id": "xyz"}}',
        b'{"meta": {"trace_id": "0123456789abcdef0123456789abcdef"}}',
        b"[1, 2",
    ]
    scenario = with_outputs(
        scenario_dict(broker_url, prefix, chains=[gateway_chain(prefix)]), tmp_path
    )

    async def spray() -> None:
        async with MqttSession(broker, f"junk-{prefix}") as session:
            for _ in range(20):  # bounded: 20 rounds over 2 s
                for body in junk:
                    await session.publish(f"{prefix}/events/X", body)
                await asyncio.sleep(0.1)

    async with gateway(broker, prefix):
        sprayer = asyncio.create_task(spray())
        result = await run_scenario_dict(tmp_path, scenario)
        await sprayer
    unmatched = result.report["chains"]["through-gateway"]["hops"]["gateway"]["unmatched"]
    assert set(unmatched) == {"not_json", "no_trace_id", "bad_trace_id", "unknown_trace_id"}
    assert unmatched["not_json"] >= 2 * 10  # two non-JSON bodies per round, most rounds in the run
    assert result.report["chains"]["through-gateway"]["failed"] == 0


async def test_same_seed_sends_the_same_signals(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """Two runs with one seed and one run id follow identical trace ids, VINs and sequence."""
    runs = []
    for n in (1, 2):
        folder = tmp_path / f"run{n}"
        folder.mkdir()
        await run_scenario_dict(
            folder,
            with_outputs(scenario_dict(broker_url, prefix, duration="1s"), folder),
            options=RunOptions(handle_signals=False, run_id="replay-1"),
        )
        runs.append([(line["trace_id"], line["vin"]) for line in read_traces(folder)])
    assert runs[0] == runs[1] and len(runs[0]) >= 40
