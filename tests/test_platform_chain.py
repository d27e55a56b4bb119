"""A whole chain through the testbed: MQTT, MQTT, MQTT, webhook, state API; faults in it."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from conftest import mqtt_hops_of_the_testbed, read_traces, run_scenario_dict, scenario_dict
from fleetprobe.core.results import SKIPPED
from fleetprobe.probes.tracker import ORDER_TOLERANCE_S
from fleetprobe.testbed.knobs import StageKnobs
from fleetprobe.testbed.mosquitto import free_port
from fleetprobe.testbed.platform import Testbed
from fleetprobe.testbed.topics import TestbedTopics
from fleetprobe.testbed.webhooks import WebhookTarget
from fleetprobe.transport.mqtt import BrokerTarget
from fleetprobe.transport.servers import serve

SECRET = "platform-test-secret"


def chain_through(prefix: str, testbed_url: str, *, api_within: str = "2s") -> dict[str, Any]:
    """broker -> gateway -> processor -> webhook -> api, on the testbed's prefixed topics."""
    return {
        "name": "telemetry-to-api",
        "signal": "telemetry",
        "hops": [
            *mqtt_hops_of_the_testbed(prefix),
            {
                "name": "webhook",
                "within": "1s",
                "webhook": {"path": "/hooks/telemetry", "secret": SECRET},
            },
            {
                "name": "api",
                "within": api_within,
                "http_poll": {
                    "url": testbed_url + "/vehicles/{vin}",
                    "every": "100ms",
                    "trace_id": "$.last_trace_id",
                    "latest": True,
                },
            },
        ],
    }


@asynccontextmanager
async def platform(
    broker: BrokerTarget, prefix: str, hook_port: int, **knobs: StageKnobs
) -> AsyncIterator[Testbed]:
    """The testbed on ``prefix`` topics, posting signed webhooks to fleetprobe's receiver."""
    target = WebhookTarget(f"http://127.0.0.1:{hook_port}/hooks/telemetry", secret=SECRET)
    async with Testbed(
        broker, topics=TestbedTopics.under(prefix), webhooks=[target], knobs=knobs, seed=3
    ) as testbed:
        yield testbed


def scenario_for(
    broker_url: str, prefix: str, tmp_path: Path, hook_port: int, chain: dict, **overrides: Any
) -> dict[str, Any]:
    """A scenario with ``chain``, every report in ``tmp_path``, webhooks on ``hook_port``."""
    scenario = scenario_dict(broker_url, prefix, chains=[chain], **overrides)
    scenario["exporters"] = {
        "json": str(tmp_path / "report.json"),
        "traces": str(tmp_path / "traces.jsonl"),
        "webhook_receiver": {"listen": f"127.0.0.1:{hook_port}"},
    }
    return scenario


async def test_every_hop_kind_reports_latency_along_the_chain(
    tmp_path: Path, broker_url: str, broker: BrokerTarget, prefix: str
) -> None:
    """mqtt -> mqtt -> mqtt -> webhook -> http_poll: every hop ok, with latency, in order."""
    hook_port = free_port()
    async with platform(broker, prefix, hook_port) as testbed:
        scenario = scenario_for(
            broker_url, prefix, tmp_path, hook_port, chain_through(prefix, testbed.url)
        )
        result = await run_scenario_dict(tmp_path, scenario)
    lines = read_traces(tmp_path)
    chain = result.report["chains"]["telemetry-to-api"]
    assert chain["followed"] == len(lines) == chain["ok"] >= 90
    for line in lines:
        hops = line["hops"]
        latency = {name: hop.get("latency_s") for name, hop in hops.items()}
        assert latency["broker"] <= latency["gateway"] <= latency["processor"]
        # The webhook is caused by the gateway's message, but the prober sees that message
        # on its own MQTT connection, racing the processor's HTTP call: allow the tracker's
        # order tolerance, as the tracker does.
        assert latency["gateway"] <= latency["webhook"] + ORDER_TOLERANCE_S
        assert hops["api"]["result"] in ("ok", "superseded")
    assert chain["hops"]["api"]["results"]["ok"] > 0
    assert chain["hops"]["webhook"]["errors"] == {}


async def test_a_dropping_processor_is_named_as_where_the_chain_breaks(
    tmp_path: Path, broker_url: str, broker: BrokerTarget, prefix: str
) -> None:
    """The processor drops 20%: those chains fail at the processor, later hops are skipped."""
    hook_port = free_port()
    fleet = {
        "vehicles": 20,
        "area": {"lat": 48.78, "lon": 9.18, "radius_km": 5},
        "profiles": [{"name": "car", "signals": {"telemetry": {"every": "100ms"}}}],
    }
    async with platform(
        broker, prefix, hook_port, processor=StageKnobs(drop_ratio=0.2, seed=11)
    ) as testbed:
        scenario = scenario_for(
            broker_url,
            prefix,
            tmp_path,
            hook_port,
            chain_through(prefix, testbed.url, api_within="1s"),
            fleet=fleet,
        )
        result = await run_scenario_dict(tmp_path, scenario)
    lines = read_traces(tmp_path)
    n = len(lines)
    failed = [line for line in lines if line["verdict"] == "failed"]
    ratio = len(failed) / n
    tolerance = 4 * math.sqrt(0.2 * 0.8 / n)  # four standard deviations of a binomial share
    assert n >= 300 and abs(ratio - 0.2) <= tolerance, (n, ratio)
    assert {line["failed_hop"] for line in failed} == {"processor"}
    assert all(line["hops"]["processor"] == {"result": "timeout"} for line in failed)
    hops = result.report["chains"]["telemetry-to-api"]["hops"]
    assert result.report["chains"]["telemetry-to-api"]["failed_at"] == {"processor": len(failed)}
    assert hops["processor"]["results"]["timeout"] == len(failed)
    # Later hops' timeouts are the processor's failure, not their own: counted as skipped
    # (or superseded at the latest-only state API, once a newer signal showed there).
    assert hops["webhook"]["results"]["timeout"] == 0
    assert hops["webhook"]["results"]["skipped"] == len(failed)
    assert hops["api"]["results"]["timeout"] == 0
    # The trace log counts alike, keeping what the hop saw itself beside it.
    assert {line["hops"]["api"]["result"] for line in failed} <= {SKIPPED, "superseded"}
    assert {line["hops"]["webhook"]["result"] for line in failed} == {SKIPPED}
    assert {line["hops"]["webhook"]["own_result"] for line in failed} == {"timeout"}


async def test_a_stalled_state_api_goes_down_and_up_with_alerts(
    tmp_path: Path, broker_url: str, broker: BrokerTarget, prefix: str
) -> None:
    """The state API stalls 5 s mid-run: its hop goes down, then up; the receiver gets both."""
    posts: list[dict[str, Any]] = []
    resolved = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        posts.append(await request.json())
        if posts[-1]["status"] == "resolved":
            resolved.set()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/alerts", receive)
    receiver, receiver_port = await serve(app, "127.0.0.1", 0)
    hook_port = free_port()
    try:
        async with platform(broker, prefix, hook_port) as testbed:
            scenario = scenario_for(
                broker_url,
                prefix,
                tmp_path,
                hook_port,
                chain_through(prefix, testbed.url, api_within="1s"),
                duration="10s",
                health={"window": "2s", "min_success_ratio": 0.9},
                alerts=[f"http://127.0.0.1:{receiver_port}/alerts"],
            )
            running = asyncio.create_task(run_scenario_dict(tmp_path, scenario))
            async with asyncio.timeout(20):  # let the API serve for a while, then stall it
                await testbed.counters.wait_for(lambda: testbed.counters.get("api", "served") >= 20)
            testbed.knobs["api"].stall_for(5.0)
            result = await running
            async with asyncio.timeout(10):
                await resolved.wait()
    finally:
        await receiver.cleanup()
    changes = [(c["hop"], c["state"]) for c in result.report["health"]]
    assert changes == [("api", "down"), ("api", "up")]
    assert result.report["health"][0]["first_failing_hop"] == "api"
    assert [p["status"] for p in posts] == ["firing", "resolved"]
    firing, resolving = (p["alerts"][0] for p in posts)
    assert firing["labels"] == resolving["labels"]
    assert firing["labels"]["alertname"] == "FleetprobeHopDown" and firing["labels"]["hop"] == "api"
    assert firing["fingerprint"] == resolving["fingerprint"]
    assert firing["startsAt"] == resolving["startsAt"] and firing["endsAt"].startswith("0001-")
