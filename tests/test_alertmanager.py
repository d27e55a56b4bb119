"""fleetprobe's alert notifications beside a real Alertmanager's (Debian's
prometheus-alertmanager).

fleetprobe posts Alertmanager's *webhook* format (version 4) to webhook receivers, and
alerts themselves to an Alertmanager's API (POST /api/v2/alerts). For the first, the real
peer is the other direction: given the same alert, Alertmanager, grouped as
deploy/alertmanager/alertmanager.yml groups, posts to a webhook receiver what fleetprobe
posts to it, field for field, but its own externalURL. For the second, the alert shows in
Alertmanager's own API, and Alertmanager notifies its receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from fleetprobe.core.events import HealthChange
from fleetprobe.exporters.alerts import GROUP_BY, NOT_ENDED, RECEIVER, AlertReceiver, AlertSender
from fleetprobe.testbed.mosquitto import free_port
from fleetprobe.transport.http import HttpClient

BINARY = "prometheus-alertmanager"
SHIPPED = Path(__file__).resolve().parents[1] / "deploy/alertmanager/alertmanager.yml"
WAIT_S = 15.0  # the most a test waits for a notification (Alertmanager sends within 0.1 s)
READY_S = 30.0  # the most Alertmanager may take to start

pytestmark = pytest.mark.needs_tool(BINARY, "prometheus-alertmanager")


class Hooks:
    """A webhook receiver on 127.0.0.1, in a thread of its own so that it outlives each
    test's loop: records every POST (path, JSON body) and answers 200."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.arrived = threading.Condition()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with hooks.arrived:
                    hooks.posts.append((self.path, body))
                    hooks.arrived.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass  # quiet

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def wait(self, path: str, status: str, **labels: str) -> dict[str, Any]:
        """The first POST to ``path`` of ``status`` whose common labels include ``labels``,
        within WAIT_S (blocking: call it in a thread from a loop)."""

        def found() -> dict[str, Any] | None:
            return next(
                (
                    body
                    for at, body in self.posts
                    if at == path
                    and body["status"] == status
                    and labels.items() <= body["commonLabels"].items()
                ),
                None,
            )

        with self.arrived:
            body = self.arrived.wait_for(found, WAIT_S)
        seen = [(at, posted["status"], posted["groupKey"]) for at, posted in self.posts]
        assert body is not None, f"no {status} POST to {path} for {labels}; posts: {seen}"
        return body


@pytest.fixture(scope="module")
def hooks() -> Iterator[Hooks]:
    """One receiver per module: fleetprobe posts to /fleetprobe, Alertmanager to /alertmanager."""
    receiver = Hooks()
    receiver.thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        receiver.thread.join(5)


@pytest.fixture(scope="module")
def alertmanager(hooks: Hooks, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's Alertmanager on loopback, once per module, notifying ``hooks``; yields its URL."""
    # Grouped as the shipped config groups; notified at once (no group wait, 100 ms group
    # interval), resolved alerts too; no cluster port (it would bind 0.0.0.0:9094).
    folder = tmp_path_factory.mktemp("alertmanager")
    config = {
        "route": {
            "receiver": RECEIVER,
            "group_by": yaml.safe_load(SHIPPED.read_text())["route"]["group_by"],
            "group_wait": "0s",
            "group_interval": "100ms",
            "repeat_interval": "1h",
        },
        "receivers": [
            {
                "name": RECEIVER,
                "webhook_configs": [{"url": f"{hooks.url}/alertmanager", "send_resolved": True}],
            }
        ],
    }
    (folder / "alertmanager.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    log_path = folder / "alertmanager.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                BINARY,
                f"--config.file={folder / 'alertmanager.yml'}",
                f"--storage.path={folder / 'data'}",
                f"--web.listen-address={url.removeprefix('http://')}",
                f"--web.external-url={url}",
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + READY_S
        while not _ready(url):
            assert process.poll() is None, f"Alertmanager ended: {log_path.read_text()}"
            assert time.monotonic() < deadline, f"not ready in {READY_S}s: {log_path.read_text()}"
            time.sleep(0.1)  # polling a starting server: there is nothing to await
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def change(chain: str, hop: str, up: bool) -> HealthChange:
    """A health change of ``chain > hop`` found now."""
    return HealthChange(
        chain=chain,
        hop=hop,
        up=up,
        at_wall_ns=time.time_ns(),
        success_ratio=0.99 if up else 0.42,
        samples=250,
        first_failing_hop=None if up else hop,
        window_s=30.0,
        objective=0.95,
    )


@contextlib.asynccontextmanager
async def fleetprobe_alerts(hooks: Hooks, scenario: str) -> AsyncIterator[AlertSender]:
    """fleetprobe's AlertSender, running, posting to /fleetprobe; all delivered on the way out."""
    async with HttpClient() as client:
        sender = AlertSender([f"{hooks.url}/fleetprobe"], client, scenario=scenario)
        sending = asyncio.create_task(sender.run())
        try:
            yield sender
            assert await sender.flush(WAIT_S)
        finally:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
    assert sender.failed == 0


async def post_to_alertmanager(url: str, *bodies: dict[str, Any]) -> None:
    """Give Alertmanager the alerts of these webhook bodies, as a Prometheus would (API v2)."""
    alerts = []
    for body in bodies:
        for alert in body["alerts"]:
            posted = {k: alert[k] for k in ("labels", "annotations", "startsAt", "generatorURL")}
            if alert["endsAt"] != NOT_ENDED:
                posted["endsAt"] = alert["endsAt"]
            alerts.append(posted)
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as http,
        http.post(f"{url}/api/v2/alerts", json=alerts) as response,
    ):
        assert response.status == 200, await response.text()


def comparable(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` without externalURL, its times as instants: RFC 3339 lets Alertmanager drop
    trailing zeros of a fraction (``.12345Z``) that fleetprobe writes (``.123450Z``)."""
    alerts = [
        alert | {key: datetime.fromisoformat(alert[key]) for key in ("startsAt", "endsAt")}
        for alert in body["alerts"]
    ]
    return {key: value for key, value in body.items() if key != "externalURL"} | {"alerts": alerts}


async def test_alertmanager_posts_what_fleetprobe_posts_firing_and_resolved(
    hooks: Hooks, alertmanager: str
) -> None:
    """For one alert, Alertmanager's firing and resolved webhook bodies equal fleetprobe's."""
    # Every field: version, groupKey, receiver, group and common labels, status, startsAt,
    # endsAt, fingerprint; but externalURL, which only Alertmanager has.
    scenario = f"s{uuid.uuid4().hex[:8]}"
    async with fleetprobe_alerts(hooks, scenario) as sender:
        sender.health_changed(change("telemetry", "processor", up=False))
        ours = await asyncio.to_thread(hooks.wait, "/fleetprobe", "firing", scenario=scenario)
        await post_to_alertmanager(alertmanager, ours)
        theirs = await asyncio.to_thread(hooks.wait, "/alertmanager", "firing", scenario=scenario)
        assert comparable(theirs) == comparable(ours)
        assert (theirs["externalURL"], ours["externalURL"]) == (alertmanager, "")

        sender.health_changed(change("telemetry", "processor", up=True))
        resolved = await asyncio.to_thread(hooks.wait, "/fleetprobe", "resolved", scenario=scenario)
        await post_to_alertmanager(alertmanager, resolved)
        theirs = await asyncio.to_thread(hooks.wait, "/alertmanager", "resolved", scenario=scenario)
        assert comparable(theirs) == comparable(resolved)
    assert resolved["alerts"][0]["startsAt"] == ours["alerts"][0]["startsAt"]
    assert resolved["alerts"][0]["endsAt"] != NOT_ENDED


async def test_alertmanager_groups_two_hops_down_apart_as_fleetprobe_does(
    hooks: Hooks, alertmanager: str
) -> None:
    """Two hops down: Alertmanager, grouped as shipped, posts one body per hop, as fleetprobe."""
    scenario = f"s{uuid.uuid4().hex[:8]}"
    hops = ("gateway", "api")
    async with fleetprobe_alerts(hooks, scenario) as sender:
        for hop in hops:
            sender.health_changed(change("telemetry", hop, up=False))
    ours = [
        await asyncio.to_thread(hooks.wait, "/fleetprobe", "firing", scenario=scenario, hop=hop)
        for hop in hops
    ]
    await post_to_alertmanager(alertmanager, *ours)
    for hop, body in zip(hops, ours, strict=True):
        theirs = await asyncio.to_thread(
            hooks.wait, "/alertmanager", "firing", scenario=scenario, hop=hop
        )
        assert comparable(theirs) == comparable(body)
        assert len(theirs["alerts"]) == 1
    assert tuple(yaml.safe_load(SHIPPED.read_text())["route"]["group_by"]) == GROUP_BY


async def listed(url: str, scenario: str, done: Any) -> list[dict[str, Any]]:
    """Alertmanager's active alerts of ``scenario`` (GET /api/v2/alerts), polled every
    0.1 s until ``done(alerts)``, within WAIT_S."""
    query = {"filter": f'scenario="{scenario}"', "active": "true"}
    async with aiohttp.ClientSession() as http, asyncio.timeout(WAIT_S):
        while True:
            async with http.get(f"{url}/api/v2/alerts", params=query) as response:
                alerts: list[dict[str, Any]] = await response.json()
            if done(alerts):
                return alerts
            await asyncio.sleep(0.1)  # polling a server's state: there is nothing to await


async def test_alerts_pushed_to_alertmanager_fire_stay_alive_and_resolve_there(
    hooks: Hooks, alertmanager: str
) -> None:
    """``{alertmanager: URL}``: the hop's alert appears in Alertmanager's own API with
    fleetprobe's labels, startsAt and generatorURL, and an endsAt ahead that each resend
    moves on; Alertmanager notifies its receiver; the resolve ends it there too."""
    scenario = f"s{uuid.uuid4().hex[:8]}"
    async with HttpClient() as client:
        sender = AlertSender(
            [AlertReceiver(alertmanager, "alertmanager")],
            client,
            scenario=scenario,
            resend_s=0.3,
            generator_url="http://127.0.0.1:9464/metrics",
        )
        running = asyncio.create_task(sender.run())
        try:
            down = change("telemetry", "gateway", up=False)
            sender.health_changed(down)
            [alert] = await listed(alertmanager, scenario, lambda alerts: alerts)
            assert alert["labels"] == {
                "alertname": "FleetprobeHopDown",
                "severity": "critical",
                "scenario": scenario,
                "chain": "telemetry",
                "hop": "gateway",
            }
            assert alert["status"]["state"] == "active"
            assert alert["generatorURL"] == "http://127.0.0.1:9464/metrics"
            starts = datetime.fromisoformat(alert["startsAt"])
            assert starts.timestamp() == pytest.approx(down.at_wall_ns / 1e9, abs=0.001)
            first_end = datetime.fromisoformat(alert["endsAt"])
            assert first_end.timestamp() > time.time()  # it ends by itself unless resent
            await listed(  # resent: still active, its end moved on
                alertmanager,
                scenario,
                lambda alerts: alerts and datetime.fromisoformat(alerts[0]["endsAt"]) > first_end,
            )
            await asyncio.to_thread(hooks.wait, "/alertmanager", "firing", scenario=scenario)

            sender.health_changed(change("telemetry", "gateway", up=True))
            await listed(alertmanager, scenario, lambda alerts: not alerts)
            await asyncio.to_thread(hooks.wait, "/alertmanager", "resolved", scenario=scenario)
            assert await sender.flush(WAIT_S)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    assert sender.failed == 0 and sender.sent >= 3  # firing, at least one resend, resolved
