"""Bad input from the platform, tried for real against a run: each is a counted result at
the hop that saw it, never a crash, and the platform's good messages still count."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import yaml
from aiohttp import web
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import assert_every_signal_accounted, scenario_dict, write_scenario
from fleetprobe.app.run import RunOptions, run_scenario
from fleetprobe.app.scenario import ScenarioError, load_scenario
from fleetprobe.app.scenario.loader import parse_scenario
from fleetprobe.transport.mqtt import MAX_MESSAGE_BYTES, BrokerTarget, MqttSession
from fleetprobe.transport.servers import serve

UNKNOWN_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def utf8_declared(payload: bytes) -> tuple[bytes, Properties]:
    properties = Properties(PacketTypes.PUBLISH)
    properties.PayloadFormatIndicator = 1  # "this payload is UTF-8", which it is not
    return payload, properties


async def test_what_the_platform_gets_wrong_is_counted_at_the_hop(
    tmp_path: Path, broker: BrokerTarget, broker_url: str, prefix: str
) -> None:
    """Non-JSON, truncated JSON, invalid UTF-8 declared UTF-8, a trace id of the wrong
    shape, an unknown id with a timestamp in the future, a stale retained message, a
    2 MB message, and a real signal delivered again: each lands under its reason."""
    hop_topic = f"{prefix}/vehicles/+/telemetry"
    bad_topic = f"{prefix}/vehicles/BAD/telemetry"
    async with aiomqtt.Client(
        broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as platform:
        await platform.publish(
            bad_topic, b'{"trace_id": "' + UNKNOWN_ID.encode() + b'"}', qos=1, retain=True
        )
        scenario = scenario_dict(broker_url, prefix, duration="3s")
        scenario["exporters"] = {"traces": str(tmp_path / "traces.jsonl")}
        loaded = load_scenario(write_scenario(tmp_path / "s.yaml", scenario))
        run = asyncio.create_task(run_scenario(loaded, RunOptions(handle_signals=False)))
        async with MqttSession(broker) as watcher:
            await watcher.subscribe([hop_topic])
            async with asyncio.timeout(20):
                async for real in watcher.messages():  # the fleet is sending
                    if real.topic != bad_topic:
                        break
        payload, declared = utf8_declared(b'{"trace_id": "\xff\xfe"}')
        for body, properties in (
            (b"not json at all", None),
            (b'{"trace_id": "' + UNKNOWN_ID.encode() + b'", "speed', None),
            (payload, declared),
            (b'{"trace_id": "xyz"}', None),
            (json.dumps({"trace_id": "0" * 31 + "1", "ts": "2099-01-01T00:00:00Z"}).encode(), None),
            (
                b'{"trace_id": "'
                + UNKNOWN_ID.encode()
                + b'", "pad": "'
                + b"p" * (2 * MAX_MESSAGE_BYTES)
                + b'"}',
                None,
            ),
            (real.payload, None),  # a QoS 1 redelivery of a real signal
        ):
            await platform.publish(
                bad_topic if body is not real.payload else real.topic,
                body,
                qos=1,
                properties=properties,
            )
        async with asyncio.timeout(60):
            result = await run

    hop = result.report["chains"]["telemetry"]["hops"]["broker"]
    assert hop["unmatched"] == {
        "retained": 1,
        "not_json": 3,  # garbage, truncated, invalid UTF-8
        "bad_trace_id": 1,
        "unknown_trace_id": 1,  # its future timestamp changes nothing
        "too_large": 1,
    }
    assert hop["duplicates"] == 1
    sent = result.report["signals"]["telemetry"]["sent"]
    assert hop["results"]["ok"] == sent  # the redelivery is no second success
    assert_every_signal_accounted(scenario, result.report, tmp_path / "traces.jsonl")


def test_an_unreadable_scenario_file_is_a_scenario_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    try:
        load_scenario(path)
    except ScenarioError as error:
        assert str(error).startswith(f"{path}:1:1: cannot read:")
    else:
        raise AssertionError("loaded")


def test_a_publish_topic_over_65535_bytes_is_refused_before_anything_starts() -> None:
    scenario = scenario_dict("mqtt://127.0.0.1:1", "p")
    scenario["signals"]["telemetry"]["topic"] = "vehicles/{vin}/" + "t" * 70_000
    try:
        parse_scenario(yaml.safe_dump(scenario), "long.yaml", environ={})
    except ScenarioError as error:
        assert "signals > telemetry > topic: a topic is at most 65535 bytes" in str(error)
    else:
        raise AssertionError("loaded")


async def test_a_100_mb_answer_to_a_poll_is_read_no_further_than_its_bound(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """A state API that streams 100 MB (chunked, no length) to every poll: the poll stops
    reading at 1 MiB and counts too_large; the hop times out; the run goes on to its end."""
    streamed: list[int] = []

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        sent = 0
        try:
            while sent < 100 << 20:
                await response.write(b"x" * 65536)
                sent += 65536
        except ConnectionError:
            pass  # the poller stopped reading: the point
        streamed.append(sent)
        return response

    app = web.Application()
    app.router.add_get("/vehicles/{vin}", huge)
    runner, port = await serve(app, "127.0.0.1", 0)
    try:
        scenario = scenario_dict(broker_url, prefix, duration="1s")
        scenario["fleet"]["vehicles"] = 2
        scenario["chains"][0]["hops"].append(
            {
                "name": "api",
                "within": "1s",
                "http_poll": {"url": f"http://127.0.0.1:{port}/vehicles/{{vin}}", "every": "200ms"},
            }
        )
        scenario["exporters"] = {"traces": str(tmp_path / "traces.jsonl")}
        loaded = load_scenario(write_scenario(tmp_path / "s.yaml", scenario))
        async with asyncio.timeout(60):
            result = await run_scenario(loaded, RunOptions(handle_signals=False))
    finally:
        await runner.cleanup()
    api = result.report["chains"]["telemetry"]["hops"]["api"]
    assert api["errors"].get("too_large", 0) > 0
    assert api["results"]["timeout"] == result.report["signals"]["telemetry"]["sent"] > 0
    assert streamed and max(streamed) < 100 << 20  # nobody read the whole answer
    assert_every_signal_accounted(scenario, result.report, tmp_path / "traces.jsonl")


async def test_a_poll_follows_no_redirect_and_a_url_template_keeps_its_host(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """A state API that redirects to another host: the poll does not go there (poll error
    http_3xx, the other host never asked). A placeholder in the host is refused at load."""
    elsewhere: list[str] = []

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"http://127.0.0.1:{other_port}/stolen")

    async def stolen(request: web.Request) -> web.StreamResponse:
        elsewhere.append(request.path)
        return web.json_response({})

    first, other = web.Application(), web.Application()
    first.router.add_get("/vehicles/{vin}", redirect)
    other.router.add_get("/stolen", stolen)
    runner, port = await serve(first, "127.0.0.1", 0)
    other_runner, other_port = await serve(other, "127.0.0.1", 0)
    try:
        scenario = scenario_dict(broker_url, prefix, duration="1s")
        scenario["fleet"]["vehicles"] = 2
        poll = {"url": f"http://127.0.0.1:{port}/vehicles/{{vin}}", "every": "100ms"}
        scenario["chains"][0]["hops"].append({"name": "api", "within": "1s", "http_poll": poll})
        loaded = load_scenario(write_scenario(tmp_path / "s.yaml", scenario))
        async with asyncio.timeout(60):
            result = await run_scenario(loaded, RunOptions(handle_signals=False))
    finally:
        await runner.cleanup()
        await other_runner.cleanup()
    assert result.report["chains"]["telemetry"]["hops"]["api"]["errors"]["http_3xx"] > 0
    assert elsewhere == []

    poll["url"] = "http://{vin}.example/state"
    try:
        parse_scenario(yaml.safe_dump(scenario), "host.yaml", environ={})
    except ScenarioError as error:
        assert "placeholders may stand in the path and query only, not the host" in str(error)
    else:
        raise AssertionError("loaded")
