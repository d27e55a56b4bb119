"""The testbed chain against a real Mosquitto: gateway, processor, state API, webhooks, knobs."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import re
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from fleetprobe.testbed.cli import add_arguments, run
from fleetprobe.testbed.knobs import STAGES, KnobUpdate, StageKnobs, parse_knob_update
from fleetprobe.testbed.mosquitto import free_port, free_ports
from fleetprobe.testbed.platform import Testbed, TestbedTopics
from fleetprobe.testbed.state import StateStore
from fleetprobe.testbed.webhooks import WebhookTarget
from fleetprobe.transport.mqtt import BrokerTarget, InboundMessage, MqttSession

SECRET = "s3cret-for-tests"
TEST_TIMEOUT_S = 10.0


# --- helpers ---------------------------------------------------------------------------


@dataclass
class Hook:
    """One webhook call as the receiver got it."""

    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook receiver: ``url(name)`` is a route whose calls land in ``calls[name]``."""

    base: str
    calls: defaultdict[str, asyncio.Queue[Hook]] = field(
        default_factory=lambda: defaultdict(asyncio.Queue)
    )

    def url(self, name: str) -> str:
        """The URL of route ``name``."""
        return f"{self.base}/hooks/{name}"


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    """A real aiohttp server on loopback that records every webhook call."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    hooks = Receiver(f"http://127.0.0.1:{sock.getsockname()[1]}")

    async def receive(request: web.Request) -> web.Response:
        hook = Hook(dict(request.headers), await request.read())
        hooks.calls[request.match_info["name"]].put_nowait(hook)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hooks/{name}", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        yield hooks
    finally:
        await runner.cleanup()


@asynccontextmanager
async def watch(
    broker: BrokerTarget, topic_filter: str
) -> AsyncIterator[asyncio.Queue[InboundMessage]]:
    """Messages on ``topic_filter``, from a subscription confirmed before this yields."""
    queue: asyncio.Queue[InboundMessage] = asyncio.Queue()
    async with MqttSession(broker, f"watch-{uuid.uuid4().hex[:12]}") as session:
        await session.subscribe([topic_filter], qos=1)

        async def pump() -> None:
            async for message in session.messages():
                queue.put_nowait(message)

        task = asyncio.create_task(pump())
        try:
            yield queue
        finally:
            task.cancel()
            await asyncio.wait({task})


@asynccontextmanager
async def running(
    broker: BrokerTarget,
    prefix: str,
    *,
    knobs: dict[str, StageKnobs] | None = None,
    webhooks: Sequence[WebhookTarget] = (),
) -> AsyncIterator[Testbed]:
    """A testbed whose topics all live under ``prefix``."""
    testbed = Testbed(
        broker, topics=TestbedTopics.under(prefix), knobs=knobs, webhooks=webhooks, seed=3
    )
    async with testbed:
        yield testbed


@asynccontextmanager
async def vehicle(broker: BrokerTarget) -> AsyncIterator[MqttSession]:
    """An MQTT session to publish signals with."""
    async with MqttSession(broker, f"car-{uuid.uuid4().hex[:12]}") as session:
        yield session


async def send(car: MqttSession, prefix: str, vin: str, signal: str) -> str:
    """Publish one signal of ``vin``; returns its trace id."""
    trace_id = uuid.uuid4().hex
    payload = {"vin": vin, "trace_id": trace_id, "sent_at": "2026-01-01T00:00:00Z", "speed": 42}
    await car.publish(f"{prefix}/vehicles/{vin}/{signal}", json.dumps(payload).encode(), qos=1)
    return trace_id


async def get_json(url: str) -> tuple[int, Any]:
    """GET ``url``: the status and the JSON body."""
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.json()


async def post_json(url: str, body: Any = None, *, raw: bytes | None = None) -> tuple[int, Any]:
    """POST ``body`` as JSON (or ``raw`` bytes) to ``url``: the status and the JSON body."""
    data = raw if raw is not None else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http, http.post(url, data=data) as response:
        return response.status, await response.json()


def signature_of(body: bytes) -> str:
    """The signature the receiver expects for ``body``."""
    return "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


# --- the chain -------------------------------------------------------------------------


async def test_a_signal_reaches_every_stage(broker: BrokerTarget, prefix: str) -> None:
    """One telemetry signal: events topic, state topic, the state API and a signed webhook."""
    async with asyncio.timeout(TEST_TIMEOUT_S), receiver() as hooks:
        target = WebhookTarget(hooks.url("all"), secret=SECRET)
        async with (
            running(broker, prefix, webhooks=[target]) as testbed,
            watch(broker, f"{prefix}/platform/events/+") as events,
            watch(broker, f"{prefix}/platform/state/+") as states,
            vehicle(broker) as car,
        ):
            trace_id = await send(car, prefix, "V1", "telemetry")

            event_message = await events.get()
            event = json.loads(event_message.payload)
            assert event_message.topic == f"{prefix}/platform/events/V1"
            assert event["meta"]["trace_id"] == trace_id
            assert event["meta"]["source_topic"] == f"{prefix}/vehicles/V1/telemetry"

            state_message = await states.get()
            state = json.loads(state_message.payload)
            assert state_message.topic == f"{prefix}/platform/state/V1"
            assert state["meta"]["trace_id"] == trace_id
            assert state["meta"]["signal"] == "telemetry"
            assert "processed_at" in state["meta"] and state["speed"] == 42

            # The processor stores before it publishes: the state message means it is stored.
            status, body = await get_json(f"{testbed.url}/vehicles/V1")
            assert status == 200
            assert body["vin"] == "V1" and body["last_trace_id"] == trace_id
            assert body["last_signal"] == "telemetry" and body["updated_at"]
            assert body["state"] == state

            hook = await hooks.calls["all"].get()
            assert hmac.compare_digest(hook.headers["X-Hub-Signature-256"], signature_of(hook.body))
            assert hook.headers["Content-Type"] == "application/json"
            assert re.fullmatch(rf"00-{trace_id}-[0-9a-f]{{16}}-01", hook.headers["traceparent"])
            call = json.loads(hook.body)
            assert call["event"] == "vehicle.state"
            assert (call["vin"], call["trace_id"], call["signal"]) == ("V1", trace_id, "telemetry")
            assert call["state"] == state


async def test_an_unknown_vehicle_is_404(broker: BrokerTarget, prefix: str) -> None:
    """GET /vehicles/{vin} for a VIN never seen: 404 with an error body."""
    async with asyncio.timeout(TEST_TIMEOUT_S), running(broker, prefix) as testbed:
        assert await get_json(f"{testbed.url}/vehicles/NOPE") == (404, {"error": "unknown vehicle"})
        assert await get_json(f"{testbed.url}/healthz") == (200, {"status": "ok"})


async def test_processor_drop_stops_the_chain_after_the_gateway(
    broker: BrokerTarget, prefix: str
) -> None:
    """Processor drop 1.0: the gateway forwards; no state message, no API state, no webhook."""
    async with (
        asyncio.timeout(TEST_TIMEOUT_S),
        receiver() as hooks,
        running(
            broker,
            prefix,
            knobs={"processor": StageKnobs(drop_ratio=1.0)},
            webhooks=[WebhookTarget(hooks.url("all"))],
        ) as testbed,
        watch(broker, f"{prefix}/platform/events/+") as events,
        watch(broker, f"{prefix}/platform/state/+") as states,
        vehicle(broker) as car,
    ):
        trace_id = await send(car, prefix, "V1", "telemetry")
        assert json.loads((await events.get()).payload)["meta"]["trace_id"] == trace_id
        counters = testbed.counters
        await counters.wait_for(lambda: counters.get("processor", "dropped") == 1)

        assert counters.get("gateway", "forwarded") == 1
        assert counters.get("processor", "forwarded") == 0
        assert states.empty()
        assert await get_json(f"{testbed.url}/vehicles/V1") == (
            404,
            {"error": "unknown vehicle"},
        )
        assert hooks.calls["all"].empty() and counters.get("webhooks", "sent") == 0


async def test_processor_delay_shows_between_events_and_state(
    broker: BrokerTarget, prefix: str
) -> None:
    """Processor delay 100 ms: the state message comes ≥ 100 ms after the event message."""
    async with (
        asyncio.timeout(TEST_TIMEOUT_S),
        running(broker, prefix, knobs={"processor": StageKnobs(delay_s=0.100)}),
        watch(broker, f"{prefix}/platform/events/+") as events,
        watch(broker, f"{prefix}/platform/state/+") as states,
        vehicle(broker) as car,
    ):
        await send(car, prefix, "V1", "telemetry")
        event_message, state_message = await events.get(), await states.get()
        step_s = (state_message.seen_ns - event_message.seen_ns) / 1e9
        assert 0.100 <= step_s < 2.0  # never less than the delay; a busy machine adds its own


async def test_gateway_stall_holds_signals_until_it_ends(broker: BrokerTarget, prefix: str) -> None:
    """A stalled gateway keeps a signal until {"stall": 0}, then forwards it."""
    async with (
        asyncio.timeout(TEST_TIMEOUT_S),
        running(broker, prefix) as testbed,
        watch(broker, f"{prefix}/platform/events/+") as events,
        vehicle(broker) as car,
    ):
        status, knobs = await post_json(f"{testbed.url}/control/gateway", {"stall": "30s"})
        assert status == 200 and knobs["stall"] > 29
        trace_id = await send(car, prefix, "V1", "telemetry")
        counters = testbed.counters
        await counters.wait_for(lambda: counters.get("gateway", "received") == 1)
        assert events.empty() and counters.get("gateway", "forwarded") == 0

        unstalled_ns = time.monotonic_ns()
        assert await post_json(f"{testbed.url}/control/gateway", {"stall": 0}) == (
            200,
            {"delay": 0.0, "jitter": 0.0, "drop": 0.0, "stall": 0.0},
        )
        message = await events.get()
        assert json.loads(message.payload)["meta"]["trace_id"] == trace_id
        assert message.seen_ns >= unstalled_ns


# --- the state API's knobs ---------------------------------------------------------------


async def test_api_drop_answers_503(broker: BrokerTarget, prefix: str) -> None:
    """API drop 1.0: every vehicle request gets 503; health and control still answer."""
    knobs = {"api": StageKnobs(drop_ratio=1.0)}
    async with asyncio.timeout(TEST_TIMEOUT_S), running(broker, prefix, knobs=knobs) as testbed:
        for _ in range(3):
            status, body = await get_json(f"{testbed.url}/vehicles/V1")
            assert status == 503 and "drop" in body["error"]
        assert (await get_json(f"{testbed.url}/healthz"))[0] == 200
        assert (await get_json(f"{testbed.url}/control"))[0] == 200
        assert testbed.counters.get("api", "dropped") == 3


async def test_api_stall_holds_a_request_for_its_duration(
    broker: BrokerTarget, prefix: str
) -> None:
    """POST /control/api {"stall": "1s"}: a request then takes about one second."""
    async with asyncio.timeout(TEST_TIMEOUT_S), running(broker, prefix) as testbed:
        status, knobs = await post_json(f"{testbed.url}/control/api", {"stall": "1s"})
        assert status == 200 and 0.9 <= knobs["stall"] <= 1.0
        started = time.monotonic()
        status, _ = await get_json(f"{testbed.url}/vehicles/V1")
        elapsed = time.monotonic() - started
        assert status == 404
        assert 0.9 <= elapsed <= 6.0  # about its second; a busy machine answers later
        assert not testbed.knobs["api"].stalled


async def test_stall_zero_ends_an_api_stall_early(broker: BrokerTarget, prefix: str) -> None:
    """A request waiting in a 30 s stall is answered soon after {"stall": 0}."""
    async with asyncio.timeout(TEST_TIMEOUT_S), running(broker, prefix) as testbed:
        await post_json(f"{testbed.url}/control/api", {"stall": "30s"})
        started = time.monotonic()
        request = asyncio.create_task(get_json(f"{testbed.url}/vehicles/V1"))
        counters = testbed.counters
        await counters.wait_for(lambda: counters.get("api", "requests") == 1)
        assert not request.done()
        status, knobs = await post_json(f"{testbed.url}/control/api", {"stall": 0})
        assert status == 200 and knobs["stall"] == 0
        assert (await request)[0] == 404
        assert time.monotonic() - started < 15.0  # not the 30 s of the stall


async def test_control_endpoint_validates_updates(broker: BrokerTarget, prefix: str) -> None:
    """Bad updates get 400 naming the key (and change nothing); unknown stages get 404."""
    async with asyncio.timeout(TEST_TIMEOUT_S), running(broker, prefix) as testbed:
        control = f"{testbed.url}/control"
        for update, key in [
            ({"delya": "1s"}, "delya"),
            ({"delay": -1}, "delay"),
            ({"jitter": "fast"}, "jitter"),
            ({"drop": 1.5}, "drop"),
            ({"stall": "-5s"}, "stall"),
            ({"delay": "1s", "drop": 2}, "drop"),
        ]:
            status, body = await post_json(f"{control}/processor", update)
            assert status == 400, update
            assert key in body["error"], body
        status, body = await post_json(f"{control}/processor", raw=b"{not json")
        assert status == 400 and "JSON" in body["error"]
        status, body = await post_json(f"{control}/processor", [1, 2])
        assert status == 400 and "object" in body["error"]
        status, body = await post_json(f"{control}/nope", {"delay": "1s"})
        assert status == 404 and "nope" in body["error"]

        status, body = await post_json(f"{control}/processor", {"delay": "250ms", "drop": 0.5})
        assert (status, body) == (200, {"delay": 0.25, "jitter": 0.0, "drop": 0.5, "stall": 0.0})
        status, every = await get_json(control)
        assert status == 200 and list(every) == list(STAGES)
        assert every["processor"] == body and every["gateway"]["delay"] == 0.0
        assert testbed.knobs["processor"].delay_s == 0.25  # the running stage's knobs


# --- webhooks ------------------------------------------------------------------------------


async def test_a_door_only_webhook_gets_no_telemetry(broker: BrokerTarget, prefix: str) -> None:
    """A target for door only gets the door event; a target for all signals gets both."""
    async with asyncio.timeout(TEST_TIMEOUT_S), receiver() as hooks:
        targets = [
            WebhookTarget(hooks.url("door"), signals=("door",)),
            WebhookTarget(hooks.url("all")),
        ]
        async with running(broker, prefix, webhooks=targets) as testbed, vehicle(broker) as car:
            telemetry_id = await send(car, prefix, "V1", "telemetry")
            door_id = await send(car, prefix, "V1", "door")
            counters = testbed.counters
            await counters.wait_for(lambda: counters.get("webhooks", "sent") == 3)

            door_hooks = [await hooks.calls["door"].get()]
            all_hooks = [await hooks.calls["all"].get() for _ in range(2)]
            assert hooks.calls["door"].empty()
            door_calls = [json.loads(hook.body) for hook in door_hooks]
            all_calls = [json.loads(hook.body) for hook in all_hooks]
            assert [(c["signal"], c["trace_id"]) for c in door_calls] == [("door", door_id)]
            assert {(c["signal"], c["trace_id"]) for c in all_calls} == {
                ("telemetry", telemetry_id),
                ("door", door_id),
            }
            # No secret, no signature.
            assert all("X-Hub-Signature-256" not in h.headers for h in door_hooks + all_hooks)


async def test_webhook_failures_are_counted_not_raised(
    broker: BrokerTarget, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A target that refuses connections: the failure is counted by reason and logged."""
    dead = WebhookTarget(f"http://127.0.0.1:{free_port()}/hooks", secret=SECRET)
    async with (
        asyncio.timeout(TEST_TIMEOUT_S),
        running(broker, prefix, webhooks=[dead]) as testbed,
        vehicle(broker) as car,
    ):
        await send(car, prefix, "V1", "telemetry")
        counters = testbed.counters
        await counters.wait_for(lambda: counters.get("webhooks", "failed_refused") == 1)
        assert (await get_json(f"{testbed.url}/vehicles/V1"))[0] == 200
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("webhook" in r.getMessage() for r in warnings)
    assert all(SECRET not in r.getMessage() for r in caplog.records)


# --- units: knobs, state, CLI ----------------------------------------------------------------


def test_a_full_knob_update_parses_into_seconds() -> None:
    """Durations as text or seconds, a drop ratio and a stall become one KnobUpdate."""
    update = parse_knob_update({"delay": "100ms", "jitter": 0.02, "drop": 0.2, "stall": "5s"})
    assert update == KnobUpdate(delay_s=0.1, jitter_s=0.02, drop_ratio=0.2, stall_s=5.0)
    assert parse_knob_update({"stall": 0}) == KnobUpdate(stall_s=0.0)
    assert parse_knob_update({"drop": 1}) == KnobUpdate(drop_ratio=1.0)
    assert parse_knob_update({}) == KnobUpdate()


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"speed": 1}, "unknown knob 'speed'"),
        ({"delay": -0.1}, "delay: must be a finite duration ≥ 0"),
        ({"delay": float("inf")}, "delay: must be a finite duration ≥ 0"),
        ({"delay": True}, "delay: expected a duration"),
        ({"jitter": "-5ms"}, "jitter: '-5ms' is not a duration"),
        ({"stall": "soon"}, "stall: 'soon' is not a duration"),
        ({"stall": None}, "stall: expected a duration"),
        ({"drop": 1.01}, "drop: must be from 0 to 1"),
        ({"drop": -0.1}, "drop: must be from 0 to 1"),
        ({"drop": float("nan")}, "drop: must be from 0 to 1"),
        ({"drop": "0.5"}, "drop: expected a number from 0 to 1"),
        ([("delay", 1)], "a knob update is a JSON object"),
    ],
)
def test_bad_knob_updates_name_the_key(update: Any, message: str) -> None:
    """Unknown keys, negative durations and drops outside 0..1 are ValueErrors naming the key."""
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_knob_update(update)


def test_delay_stays_within_jitter_and_drops_follow_the_ratio() -> None:
    """delay() draws within delay ± jitter (never below 0); seeded draws repeat."""
    knobs = StageKnobs(delay_s=0.1, jitter_s=0.05, seed=7)
    draws = [knobs.delay() for _ in range(1000)]
    assert all(0.05 <= d <= 0.15 for d in draws) and len(set(draws)) > 900
    again = StageKnobs(delay_s=0.1, jitter_s=0.05, seed=7)
    assert [again.delay() for _ in range(1000)] == draws
    assert StageKnobs(delay_s=0.01, jitter_s=1.0, seed=1).delay() >= 0
    assert not any(StageKnobs(drop_ratio=0.0, seed=1).drops() for _ in range(1000))
    assert all(StageKnobs(drop_ratio=1.0, seed=1).drops() for _ in range(1000))
    half = StageKnobs(drop_ratio=0.5, seed=1)
    assert 400 < sum(half.drops() for _ in range(1000)) < 600


async def test_a_stall_ends_by_itself_or_by_stall_zero() -> None:
    """wait_unstalled returns at once unstalled, at the stall's end, or when it is lifted."""
    knobs = StageKnobs()
    async with asyncio.timeout(5):
        await knobs.wait_unstalled()
        knobs.stall_for(0.05)
        assert knobs.stalled and 0 < knobs.stall_remaining_s <= 0.05
        await knobs.wait_unstalled()
        assert not knobs.stalled and knobs.stall_remaining_s == 0

        knobs.stall_for(60)
        waiter = asyncio.create_task(knobs.wait_unstalled())
        await asyncio.wait({waiter}, timeout=0)  # let it start waiting
        assert not waiter.done()
        knobs.apply(KnobUpdate(stall_s=0.0))
        await waiter
        assert not knobs.stalled
    with pytest.raises(ValueError, match="stall"):
        knobs.stall_for(-1)


def test_the_store_keeps_the_newest_event() -> None:
    """An older sent_at never replaces a newer one; without sent_at, arrival order decides."""
    store = StateStore()
    newer = {"sent_at": "2026-01-01T00:00:02Z", "meta": {"trace_id": "b", "signal": "door"}}
    older = {"sent_at": "2026-01-01T00:00:01Z", "meta": {"trace_id": "a", "signal": "door"}}
    assert store.update("V1", newer, arrival=1)
    assert not store.update("V1", older, arrival=2)
    state = store.get("V1")
    assert state is not None and state.trace_id == "b" and state.signal == "door"
    assert store.update("V2", {"meta": {"trace_id": "x"}}, arrival=5)
    assert not store.update("V2", {"meta": {"trace_id": "y"}}, arrival=4)
    assert store.update("V2", {"meta": {"trace_id": "z"}}, arrival=6)
    assert (store.get("V2") or pytest.fail()).trace_id == "z"
    assert store.get("V3") is None and len(store) == 2


def _parse(*argv: str) -> argparse.Namespace:
    """``argv`` parsed by a parser with the testbed's options."""
    parser = argparse.ArgumentParser(prog="fleetprobe testbed")
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_parses_webhooks_and_stage_knobs() -> None:
    """--webhook takes an optional SIGNALS= prefix; per-stage knobs take durations."""
    args = _parse(
        "--mqtt",
        "mqtt://127.0.0.1:1883",
        "--webhook",
        "door,trip=http://127.0.0.1:9000/hooks?token=a=b",
        "--webhook",
        "https://example.test/all?x=1",
        "--processor-delay",
        "100ms",
        "--api-drop",
        "0.5",
        "--delay",
        "20ms",
    )
    assert args.webhook == [
        (("door", "trip"), "http://127.0.0.1:9000/hooks?token=a=b"),
        (None, "https://example.test/all?x=1"),
    ]
    assert (args.processor_delay, args.api_drop, args.gateway_delay) == (0.1, 0.5, 0.02)
    assert args.http == "127.0.0.1:8080"
    with pytest.raises(SystemExit):
        _parse("--mqtt", "mqtt://x", "--webhook", "door=ftp://host/x")
    with pytest.raises(SystemExit):
        _parse("--mqtt", "mqtt://x", "--webhooks-drop", "2")


def test_cli_exits_3_when_the_broker_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    """`fleetprobe testbed` against a closed port: exit 3 and a message naming the broker."""
    url = f"mqtt://127.0.0.1:{free_port()}"
    assert run(_parse("--mqtt", url, "--http", "127.0.0.1:0")) == 3
    assert any("unreachable" in r.getMessage() and url in r.getMessage() for r in caplog.records)


def test_cli_refuses_a_missing_secret_variable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """--webhook-secret-env naming an unset variable: exit 2, the variable named."""
    monkeypatch.delenv("FLEETPROBE_TEST_NO_SUCH_SECRET", raising=False)
    args = _parse(
        "--mqtt",
        "mqtt://127.0.0.1:1",
        "--webhook",
        "http://127.0.0.1:9/x",
        "--webhook-secret-env",
        "FLEETPROBE_TEST_NO_SUCH_SECRET",
    )
    assert run(args) == 2
    assert any("FLEETPROBE_TEST_NO_SUCH_SECRET" in r.getMessage() for r in caplog.records)


def test_free_ports_are_distinct() -> None:
    """Ports picked together never repeat (two free_port calls in a row may)."""
    for _ in range(200):
        ports = free_ports(3)
        assert len(set(ports)) == 3
