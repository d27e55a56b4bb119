"""Secrets stay secret: a run with an MQTT password, a webhook secret and an API token in
a poll header, at debug logging, and every output it makes searched for them."""

from __future__ import annotations

import json
from pathlib import Path

from aiohttp import web

from conftest import (
    finish,
    fleetprobe,
    mqtt_hops_of_the_testbed,
    scenario_dict,
    scrape_until,
    write_scenario,
)
from fleetprobe.testbed.mosquitto import MosquittoProcess, free_ports
from fleetprobe.testbed.platform import Testbed
from fleetprobe.testbed.topics import TestbedTopics
from fleetprobe.testbed.webhooks import WebhookTarget
from fleetprobe.transport.mqtt import BrokerTarget
from fleetprobe.transport.servers import serve

PASSWORD = "Pw-Quokka-5521-not-for-logs"
HOOK_SECRET = "Hook-Narwhal-8830-not-for-logs"
API_TOKEN = "Token-Axolotl-1207-not-for-logs"
SECRETS = (PASSWORD, HOOK_SECRET, API_TOKEN)
ENV = {"FLEET_PASSWORD": PASSWORD, "HOOK_SECRET": HOOK_SECRET, "API_TOKEN": API_TOKEN}


def secret_scenario(url: str, prefix: str, state_api: str, hook_port: int, port: int) -> dict:
    chain = {
        "name": "telemetry",
        "signal": "telemetry",
        "hops": [
            *mqtt_hops_of_the_testbed(prefix),
            {
                "name": "webhook",
                "within": "1s",
                "webhook": {"path": "/hooks/telemetry", "secret": "${HOOK_SECRET}"},
            },
            {
                "name": "api",
                "within": "2s",
                "http_poll": {
                    "url": state_api + "/vehicles/{vin}",
                    "every": "100ms",
                    "trace_id": "$.last_trace_id",
                    "latest": True,
                    "headers": {"Authorization": "Bearer ${API_TOKEN}"},
                },
            },
        ],
    }
    scenario = scenario_dict(url, prefix, duration="3s", chains=[chain])
    scenario["target"]["mqtt"].update(username="probe", password="${FLEET_PASSWORD}")
    scenario["slo"] = [{"chain": "telemetry", "success_ratio": 0.5}]
    scenario["exporters"] = {
        "prometheus": {"listen": f"127.0.0.1:{port}"},
        "webhook_receiver": {"listen": f"127.0.0.1:{hook_port}"},
        "json": "out/report.json",
        "junit": "out/junit.xml",
        "traces": "out/traces.jsonl",
    }
    return scenario


async def test_no_secret_appears_in_any_output_of_a_run(tmp_path: Path, prefix: str) -> None:
    """stdout and stderr (debug), report.json, junit.xml, traces.jsonl, /metrics and
    `fleetprobe validate`: none holds a secret, while the run did use all three."""
    hook_port, metrics_port = free_ports(2)
    seen_authorization: list[str] = []

    with MosquittoProcess(users={"probe": PASSWORD, "platform": "platform-pw"}) as broker:
        platform = BrokerTarget(
            broker.host, broker.port, username="platform", password="platform-pw"
        )
        hook = WebhookTarget(f"http://127.0.0.1:{hook_port}/hooks/telemetry", secret=HOOK_SECRET)
        async with Testbed(platform, topics=TestbedTopics.under(prefix), webhooks=[hook], seed=3):

            async def state_api(request: web.Request) -> web.StreamResponse:
                # A state API that checks who asks and has nothing to show: the api hop
                # times out, and its poll errors are logged and counted.
                seen_authorization.append(request.headers.get("Authorization", ""))
                raise web.HTTPNotFound()

            app = web.Application()
            app.router.add_get("/vehicles/{vin}", state_api)
            runner, api_port = await serve(app, "127.0.0.1", 0)
            try:
                scenario = secret_scenario(
                    broker.url, prefix, f"http://127.0.0.1:{api_port}", hook_port, metrics_port
                )
                path = write_scenario(tmp_path / "s.yaml", scenario)
                validate = await fleetprobe("validate", str(path), cwd=tmp_path, env=ENV)
                outputs = list((await finish(validate))[1:])
                process = await fleetprobe("-v", "run", str(path), cwd=tmp_path, env=ENV)
                outputs.append(await scrape_until(metrics_port, lambda t: "hop_up" in t))
                code, out, err = await finish(process, 60)
            finally:
                await runner.cleanup()

    outputs += [out, err]
    outputs += [(tmp_path / "out" / name).read_text() for name in ("report.json", "junit.xml")]
    outputs.append((tmp_path / "out" / "traces.jsonl").read_text())
    assert code == 1, err  # the api hop timed out: the objective failed
    assert f"Bearer {API_TOKEN}" in seen_authorization  # the token was really sent
    hops = json.loads(outputs[-3])["chains"]["telemetry"]["hops"]
    assert hops["webhook"]["results"]["ok"] > 0  # signed with the secret, and checked
    assert "fleetprobe: test" in out
    for text in outputs:
        for secret in SECRETS:
            assert secret not in text


async def test_refused_credentials_end_the_run_without_showing_them(
    tmp_path: Path, prefix: str
) -> None:
    """A wrong password: exit 3 naming the refusal, not the password."""
    with MosquittoProcess(users={"probe": "the-right-one"}) as broker:
        scenario = scenario_dict(broker.url, prefix)
        scenario["target"]["mqtt"].update(username="probe", password="${FLEET_PASSWORD}")
        path = write_scenario(tmp_path / "s.yaml", scenario)
        code, out, err = await finish(
            await fleetprobe("-v", "run", str(path), cwd=tmp_path, env=ENV)
        )
    assert code == 3
    assert "broker refused the credentials" in err
    assert PASSWORD not in out + err
