"""The http_poll and webhook observers against real aiohttp servers and clients on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from fleetprobe.core.events import RunEvents
from fleetprobe.core.results import FollowedSignal, HopResult
from fleetprobe.probes.chains import ChainSpec, HopSpec
from fleetprobe.probes.observers import ObserverContext, WatchedHop
from fleetprobe.probes.observers.http_poll import HttpPollHop, HttpPollObserver
from fleetprobe.probes.observers.webhook import WebhookHop, WebhookObserver
from fleetprobe.probes.tracker import Tracker, sweep_deadlines
from fleetprobe.testbed.mosquitto import free_port
from fleetprobe.transport.mqtt import BrokerTarget
from fleetprobe.transport.servers import serve

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Record(RunEvents):
    """What the tracker and the observer reported: the run's events they emitted."""

    def __init__(self) -> None:
        self.verdicts: list[FollowedSignal] = []
        self.hop_errors: Counter[str] = Counter()
        self.unmatched_seen: Counter[str] = Counter()
        self.judged = asyncio.Event()
        self.expected = 0

    def verdict(self, signal: FollowedSignal) -> None:
        self.verdicts.append(signal)
        if len(self.verdicts) >= self.expected:
            self.judged.set()

    def unmatched(self, chain_index: int, hop_index: int, reason: str) -> None:
        self.unmatched_seen[reason] += 1

    def hop_error(self, chain_index: int, hop_index: int, reason: str) -> None:
        self.hop_errors[reason] += 1


@asynccontextmanager
async def http_server(routes: dict[str, Handler]) -> AsyncIterator[str]:
    """A real aiohttp server with GET ``routes`` on 127.0.0.1; yields its base URL."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner, port = await serve(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def observing(
    kind: type[HttpPollObserver] | type[WebhookObserver],
    config: Any,
    record: Record,
    *,
    within_s: float = 2.0,
    latest: bool = False,
    listen_port: int = 0,
) -> AsyncIterator[tuple[Tracker, Any]]:
    """A one-hop chain watched by ``kind``, with its deadline sweep running."""
    chain = ChainSpec(
        "c", "telemetry", (HopSpec("api", within_s, latest=latest, uses_fields=True),)
    )
    tracker = Tracker([chain], record)
    context = ObserverContext(
        tracker, BrokerTarget("127.0.0.1", 1), record, ("127.0.0.1", listen_port)
    )
    observer = kind([WatchedHop(0, 0, "c", "api", config)], context)
    await observer.start()
    running = asyncio.create_task(observer.run())
    sweeping = asyncio.create_task(sweep_deadlines(tracker, lambda: False))
    try:
        yield tracker, observer
    finally:
        running.cancel()
        sweeping.cancel()
        await observer.close()


def follow(tracker: Tracker, n: int, vin: str) -> str:
    """Follow signal ``n`` of ``vin`` now; return its trace id."""
    trace_id = f"{n:032x}"
    now = time.monotonic_ns()
    tracker.follow(0, trace_id, "telemetry", vin, now, now, time.time_ns(), {"vin": vin})
    return trace_id


async def test_polls_coalesce_to_one_request_per_vehicle_per_interval() -> None:
    """1,000 vehicles, 2 signals pending each, 200 ms: one GET per vehicle per interval at most."""
    asked: dict[str, list[float]] = defaultdict(list)
    asked_twice = asyncio.Event()

    async def state(request: web.Request) -> web.Response:
        times = asked[request.match_info["vin"]]
        times.append(time.monotonic())
        if len(times) == 2 and sum(len(t) >= 2 for t in asked.values()) == 1000:
            asked_twice.set()
        return web.json_response({"error": "unknown"}, status=404)

    record = Record()
    async with http_server({"/vehicles/{vin}": state}) as base:
        config = HttpPollHop(
            url=base + "/vehicles/{vin}", every="200ms", concurrency=64, trace_id="$.last_trace_id"
        )
        started = time.monotonic()
        async with observing(HttpPollObserver, config, record, within_s=60) as (tracker, _):
            for n in range(2000):
                follow(tracker, n, f"V{n % 1000}")
            # Every vehicle asked again: however busy the machine, the rounds go on.
            async with asyncio.timeout(50):
                await asked_twice.wait()
        elapsed = time.monotonic() - started
        counts = {vin: len(times) for vin, times in asked.items()}
    assert len(counts) == 1000
    # Two signals wait per vehicle, yet each vehicle is asked at most once per round, and a
    # round starts at most every 200 ms (a late loop skips rounds, it never bursts): a bound
    # that only grows when the machine is slow.
    assert max(counts.values()) <= int(elapsed / 0.2) + 1
    # Each answer is counted as "not found yet" (less those cut off when the test ends:
    # at most the 64 requests in flight).
    assert set(record.hop_errors) == {"not_found"}
    assert sum(counts.values()) - 64 <= record.hop_errors["not_found"]


async def test_a_state_api_sighting_and_latest_only_superseding() -> None:
    """The newest signal shown by a latest-only API is ok; the vehicle's older one is superseded."""
    shown: dict[str, str] = {}

    async def state(request: web.Request) -> web.Response:
        vin = request.match_info["vin"]
        if vin not in shown:
            return web.json_response({}, status=404)
        return web.json_response({"vin": vin, "last_trace_id": shown[vin]})

    record = Record()
    record.expected = 2
    async with http_server({"/vehicles/{vin}": state}) as base:
        config = HttpPollHop(
            url=base + "/vehicles/{vin}", every="50ms", trace_id="$.last_trace_id", latest=True
        )
        async with observing(HttpPollObserver, config, record, latest=True) as (tracker, _):
            follow(tracker, 1, "V1")
            newer = follow(tracker, 2, "V1")
            shown["V1"] = newer
            async with asyncio.timeout(5):
                await record.judged.wait()
    results = {s.trace_id: s.results[0] for s in record.verdicts}
    assert results == {f"{1:032x}": HopResult.SUPERSEDED, newer: HopResult.OK}
    assert all(s.verdict is not None and s.verdict.value == "ok" for s in record.verdicts)


async def test_poll_errors_are_counted_by_reason_and_the_hop_times_out() -> None:
    """503, non-JSON, a body without the id and a slow answer are counted; the hop times out."""
    replies = {
        "A": web.Response(status=503),
        "B": web.Response(text="<html>", content_type="text/html"),
        "C": web.json_response({"vin": "C"}),
    }

    async def state(request: web.Request) -> web.Response:
        vin = request.match_info["vin"]
        if vin == "D":
            await asyncio.sleep(1)  # slower than the poll timeout
        return replies.get(vin, web.json_response({}, status=404))

    record = Record()
    record.expected = 4
    async with http_server({"/vehicles/{vin}": state}) as base:
        config = HttpPollHop(url=base + "/vehicles/{vin}", every="100ms", timeout="300ms")
        async with observing(HttpPollObserver, config, record, within_s=0.8) as (tracker, _):
            for n, vin in enumerate("ABCD"):
                follow(tracker, n, vin)
            async with asyncio.timeout(5):
                await record.judged.wait()
    assert {s.results[0] for s in record.verdicts} == {HopResult.TIMEOUT}
    # (a reused connection that the slow server dropped may add "connection")
    assert {"unavailable", "not_json", "no_trace_id", "timeout"} <= set(record.hop_errors)


async def test_webhook_calls_are_matched_and_bad_signatures_refused() -> None:
    """Signed calls match; unsigned, badly signed and oversized calls are refused and counted."""
    secret = "s3cret-for-test"
    port = free_port()
    record = Record()
    record.expected = 2
    config = WebhookHop(path="/hooks/t", secret=secret, max_body=4096)
    async with observing(WebhookObserver, config, record, within_s=1, listen_port=port) as (
        tracker,
        observer,
    ):
        good, forged = follow(tracker, 1, "V1"), follow(tracker, 2, "V2")
        url = f"http://127.0.0.1:{observer.port}/hooks/t"

        def signed(body: bytes, key: str = secret) -> dict[str, str]:
            digest = hmac.new(key.encode(), body, hashlib.sha256).hexdigest()
            return {"X-Hub-Signature-256": f"sha256={digest}", "Content-Type": "application/json"}

        async with aiohttp.ClientSession() as http:
            good_body = json.dumps({"trace_id": good}).encode()
            forged_body = json.dumps({"trace_id": forged}).encode()
            statuses = []
            for body, headers in (
                (good_body, signed(good_body)),
                (forged_body, signed(forged_body, "wrong")),
                (forged_body, {}),
                (b"x" * 10_000, signed(b"x" * 10_000)),
            ):
                async with http.post(url, data=body, headers=headers) as response:
                    statuses.append(response.status)
        async with asyncio.timeout(5):
            await record.judged.wait()
    results = {s.trace_id: s.results[0] for s in record.verdicts}
    assert statuses == [204, 401, 401, 413]
    assert results == {good: HopResult.OK, forged: HopResult.TIMEOUT}
    assert record.hop_errors == Counter(bad_signature=1, missing_signature=1, too_large=1)


async def test_webhook_trace_id_from_a_header() -> None:
    """A webhook hop can read the trace id from a traceparent header."""
    record = Record()
    record.expected = 1
    config = WebhookHop(path="/hooks/h", header="traceparent")
    async with observing(WebhookObserver, config, record, listen_port=free_port()) as (
        tracker,
        observer,
    ):
        trace_id = follow(tracker, 7, "V7")
        async with aiohttp.ClientSession() as http:
            headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
            async with http.post(
                f"http://127.0.0.1:{observer.port}/hooks/h", data=b"{}", headers=headers
            ) as response:
                assert response.status == 204
        async with asyncio.timeout(5):
            await record.judged.wait()
    assert record.verdicts[0].results[0] is HopResult.OK
