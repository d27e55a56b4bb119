"""Alerts: Alertmanager webhook bodies POSTed to a real receiver, retries, failures, drops."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from conftest import scenario_dict, write_scenario
from fleetprobe.app.plan import alert_receivers
from fleetprobe.app.run import metrics_url
from fleetprobe.app.scenario import ScenarioError, load_scenario
from fleetprobe.core.events import HealthChange
from fleetprobe.exporters.alerts import (
    NOT_ENDED,
    AlertReceiver,
    AlertSender,
    fingerprint,
    webhook_payload,
)
from fleetprobe.testbed.mosquitto import free_port
from fleetprobe.transport.http import HttpClient
from fleetprobe.transport.servers import serve

WALL = 1_795_341_600_123_456_789  # 2026-11-22T10:00:00.123456789Z
S = 1_000_000_000
WAIT_S = 5.0  # the most any test waits for something that should come at once


def change(up: bool, at_wall_ns: int = WALL, hop: str = "api") -> HealthChange:
    """A health change of hop ``hop`` of chain telemetry-to-api."""
    return HealthChange(
        chain="telemetry-to-api",
        hop=hop,
        up=up,
        at_wall_ns=at_wall_ns,
        success_ratio=0.99 if up else 0.61,
        samples=100,
        first_failing_hop=None if up else hop,
        window_s=30.0,
        objective=0.95,
    )


class Receiver:
    """A webhook receiver on 127.0.0.1 that records every POST and answers from a script."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])  # answers to give first; then 200
        self.posts: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.content_types: list[str] = []
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        """Record the body, answer with the next scripted status."""
        self.requests += 1
        self.content_types.append(request.content_type)
        self.posts.put_nowait((request.path, await request.json()))
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)

    async def next_post(self) -> tuple[str, dict[str, Any]]:
        """The next POST (path, body), within WAIT_S."""
        async with asyncio.timeout(WAIT_S):
            return await self.posts.get()


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[str]:
    """Serve ``receiver`` at POST /hook/{name}; yields the base URL."""
    app = web.Application()
    app.router.add_post("/hook/{name}", receiver.handle)
    app.router.add_post("/hook/{name}/api/v2/alerts", receiver.handle)
    runner, port = await serve(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def sending(sender: AlertSender) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``sender`` in a task; cancel it on the way out and check it ends cancelled."""
    task = asyncio.create_task(sender.run())
    try:
        yield task
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_firing_then_resolved_pair_up_at_every_receiver() -> None:
    """Down then up: a firing and a resolved POST with one fingerprint and startsAt, per URL."""
    receiver = Receiver()
    registry = CollectorRegistry()
    async with receiving(receiver) as base, HttpClient() as client:
        sender = AlertSender([f"{base}/a", f"{base}/b"], client, scenario="demo", registry=registry)
        async with sending(sender):
            sender.health_changed(change(up=False))
            sender.health_changed(change(up=True, at_wall_ns=WALL + 90 * S))
            assert await sender.flush(WAIT_S)
            posts = [await receiver.next_post() for _ in range(4)]
    assert [(path, body["status"]) for path, body in posts] == [
        ("/hook/a", "firing"),
        ("/hook/b", "firing"),
        ("/hook/a", "resolved"),
        ("/hook/b", "resolved"),
    ]
    assert receiver.content_types == ["application/json"] * 4
    firing, resolved = posts[0][1], posts[2][1]
    labels = {
        "alertname": "FleetprobeHopDown",
        "severity": "critical",
        "scenario": "demo",
        "chain": "telemetry-to-api",
        "hop": "api",
    }
    assert firing == {
        "version": "4",
        "groupKey": (
            '{}:{alertname="FleetprobeHopDown", chain="telemetry-to-api", hop="api", '
            'scenario="demo"}'
        ),
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "fleetprobe",
        "groupLabels": {
            "alertname": "FleetprobeHopDown",
            "scenario": "demo",
            "chain": "telemetry-to-api",
            "hop": "api",
        },
        "commonLabels": labels,
        "commonAnnotations": firing["alerts"][0]["annotations"],
        "externalURL": "",
        "alerts": [
            {
                "status": "firing",
                "labels": labels,
                "annotations": {
                    "summary": "fleetprobe: hop telemetry-to-api > api is down",
                    "description": (
                        "61.0% of 100 signals ok at hop api of chain telemetry-to-api over "
                        "the last 30s (objective 95.0%); first failing hop: api"
                    ),
                },
                "startsAt": "2026-11-22T10:00:00.123456Z",
                "endsAt": NOT_ENDED,
                "generatorURL": "",
                "fingerprint": fingerprint(labels),
            }
        ],
    }
    (alert,) = resolved["alerts"]
    assert alert["status"] == "resolved"
    assert alert["labels"] == labels
    assert alert["fingerprint"] == firing["alerts"][0]["fingerprint"]
    assert alert["startsAt"] == "2026-11-22T10:00:00.123456Z"
    assert alert["endsAt"] == "2026-11-22T10:01:30.123456Z"
    assert resolved["groupKey"] == firing["groupKey"]
    assert (sender.sent, sender.failed, sender.dropped) == (4, 0, 0)
    sample = registry.get_sample_value
    assert sample("fleetprobe_alerts_sent_total", {"scenario": "demo", "result": "ok"}) == 4.0
    assert sample("fleetprobe_alerts_sent_total", {"scenario": "demo", "result": "failed"}) == 0.0


async def test_a_500_is_retried_until_it_succeeds() -> None:
    """Two 500 answers, then 200: the third try delivers, nothing is counted as failed."""
    receiver = Receiver(statuses=[500, 503])
    async with receiving(receiver) as base, HttpClient() as client:
        sender = AlertSender([f"{base}/a"], client, scenario="demo", backoff_s=0.01)
        async with sending(sender):
            sender.health_changed(change(up=False))
            assert await sender.flush(WAIT_S)
    assert receiver.requests == 3
    assert (sender.sent, sender.failed) == (1, 0)


async def test_retries_are_bounded_and_a_4xx_is_not_retried() -> None:
    """Three 500s make one counted failure; a 400 fails at once; the next alert still goes."""
    receiver = Receiver(statuses=[500, 500, 500, 400])
    async with receiving(receiver) as base, HttpClient() as client:
        sender = AlertSender([f"{base}/a"], client, scenario="demo", backoff_s=0.01)
        async with sending(sender) as task:
            sender.health_changed(change(up=False, hop="broker"))
            sender.health_changed(change(up=False, hop="api"))
            sender.health_changed(change(up=True, hop="api"))
            assert await sender.flush(WAIT_S)
            assert not task.done()
    assert receiver.requests == 5
    assert (sender.sent, sender.failed) == (1, 2)


async def test_a_receiver_that_is_down_is_a_counted_failure() -> None:
    """Nobody listens at the URL: the tries fail, one failure is counted, run() goes on."""
    registry = CollectorRegistry()
    url = f"http://127.0.0.1:{free_port()}/hook"
    async with HttpClient() as client:
        sender = AlertSender([url], client, scenario="demo", backoff_s=0.01, registry=registry)
        async with sending(sender) as task:
            sender.health_changed(change(up=False))
            assert await sender.flush(WAIT_S)
            assert not task.done()
    assert (sender.sent, sender.failed, sender.dropped) == (0, 1, 0)
    failed = {"scenario": "demo", "result": "failed"}
    assert registry.get_sample_value("fleetprobe_alerts_sent_total", failed) == 1.0


async def test_a_full_queue_drops_and_counts() -> None:
    """Over queue_limit, notify() drops the change and counts it, without blocking."""
    registry = CollectorRegistry()
    async with HttpClient() as client:
        sender = AlertSender(
            ["http://127.0.0.1:1/"], client, scenario="demo", queue_limit=2, registry=registry
        )
        for n in range(5):
            sender.health_changed(change(up=n % 2 == 1))
        assert (sender.pending, sender.dropped) == (2, 3)
        dropped = {"scenario": "demo", "result": "dropped"}
        assert registry.get_sample_value("fleetprobe_alerts_sent_total", dropped) == 3.0
        assert not await sender.flush(0.05)  # nothing delivers: flush gives up in time


def test_payload_fingerprint_is_alertmanagers() -> None:
    """The fingerprint is Prometheus' label signature (FNV-1a), checked on its own test vector."""
    known = {"name": "garland, briggs", "fear": "love is not enough"}
    assert int(fingerprint(known), 16) == 5799056148416392346
    assert fingerprint({}) == "cbf29ce484222325"
    body = webhook_payload(
        change(up=False), status="firing", scenario="demo", starts_at="x", ends_at=NOT_ENDED
    )
    json.dumps(body)  # JSON-ready
    assert body["alerts"][0]["fingerprint"] == fingerprint(body["alerts"][0]["labels"])


async def test_only_alertmanagers_get_a_firing_alert_again() -> None:
    """A webhook receiver hears of each change once; an Alertmanager gets the firing alert
    again every resend, as a list of alerts at /api/v2/alerts with endsAt ahead, and the
    resolve with endsAt the time the hop came back."""
    receiver = Receiver()
    app_paths: list[tuple[str, Any]] = []
    async with receiving(receiver) as base, HttpClient() as client:
        sender = AlertSender(
            [f"{base}/plain", AlertReceiver(f"{base}/am/", "alertmanager")],
            client,
            scenario="demo",
            resend_s=0.05,
        )
        async with sending(sender):
            sender.health_changed(change(up=False))
            while len([p for p, _ in app_paths if p.endswith("/api/v2/alerts")]) < 3:
                app_paths.append(await receiver.next_post())
            sender.health_changed(change(up=True, at_wall_ns=WALL + 90 * S))
            while not any(
                p.endswith("/api/v2/alerts") and body[0]["endsAt"].startswith("2026-11-22T10:01")
                for p, body in app_paths
            ):
                app_paths.append(await receiver.next_post())
            assert await sender.flush(WAIT_S)  # every delivery answered: every POST recorded
    while not receiver.posts.empty():
        app_paths.append(receiver.posts.get_nowait())
    plain = [body["status"] for path, body in app_paths if path == "/hook/plain"]
    assert plain == ["firing", "resolved"]
    pushed = [body for path, body in app_paths if path == "/hook/am/api/v2/alerts"]
    firing, resolved = pushed[0][0], pushed[-1][0]
    assert firing["labels"]["hop"] == "api" and firing["startsAt"] == resolved["startsAt"]
    assert firing["endsAt"] > "2026"  # a time ahead, not Go's zero time
    assert resolved["endsAt"] == "2026-11-22T10:01:30.123456Z"


def test_alert_destinations_in_a_scenario(tmp_path: Path) -> None:
    """A plain URL and ``{webhook: URL}`` are webhook receivers, ``{alertmanager: URL}`` an
    Alertmanager; an entry with both, or neither, is refused with its place."""
    scenario = scenario_dict("mqtt://127.0.0.1:1883", "p")
    scenario["alerts"] = [
        "http://127.0.0.1:9/a",
        {"webhook": "http://127.0.0.1:9/b"},
        {"alertmanager": "http://127.0.0.1:9093"},
    ]
    loaded = load_scenario(write_scenario(tmp_path / "ok.yaml", scenario))
    assert alert_receivers(loaded.scenario.alerts) == [
        AlertReceiver("http://127.0.0.1:9/a"),
        AlertReceiver("http://127.0.0.1:9/b"),
        AlertReceiver("http://127.0.0.1:9093", "alertmanager"),
    ]
    scenario["alerts"] = [{"webhook": "http://127.0.0.1:9/b", "alertmanager": "http://x:1"}]
    both = r"bad.yaml:37:3: alerts\[0\] > destination: give exactly one of alertmanager or"
    with pytest.raises(ScenarioError, match=both):
        load_scenario(write_scenario(tmp_path / "bad.yaml", scenario))


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:9464/metrics"),
        ("::1", "http://[::1]:9464/metrics"),
        ("0.0.0.0", f"http://{socket.gethostname()}:9464/metrics"),
    ],
)
def test_the_generator_url_is_one_a_person_can_open(host: str, url: str) -> None:
    assert metrics_url(host, 9464) == url
