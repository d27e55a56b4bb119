"""http_poll's timing and polling promises, and TCP_NODELAY on every socket fleetprobe opens.

Real parts only: the http_poll observer with a real tracker against a real aiohttp server,
a real MQTT session to the session's Mosquitto, fleetprobe's own servers (webhook receiver,
/metrics). A socket's options are read from the live socket itself, found among this
process's file descriptors by its two addresses.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from test_http_observers import Record, follow, http_server, observing

from fleetprobe.core.results import HopResult
from fleetprobe.exporters.server import make_metrics_app
from fleetprobe.probes.observers.http_poll import HttpPollHop, HttpPollObserver
from fleetprobe.probes.observers.webhook import WebhookHop, WebhookObserver
from fleetprobe.transport.http import HttpClient
from fleetprobe.transport.mqtt import BrokerTarget, MqttSession
from fleetprobe.transport.servers import serve

MS = 1_000_000

needs_proc_fds = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not Path("/proc/self/fd").is_dir(),
    reason="finds live sockets through /proc/self/fd (Linux)",
)


class TcpSocket(NamedTuple):
    """A connected TCP socket of this process: its two ends and whether TCP_NODELAY is on."""

    local: tuple[str, int]
    peer: tuple[str, int]
    nodelay: bool


def connected_tcp_sockets() -> list[TcpSocket]:
    """Every connected TCP socket this process holds, with TCP_NODELAY read off the socket."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:
            continue  # the descriptor of the listing itself, gone by now
        try:
            sock = socket.socket(fileno=fd)  # a duplicate: closing it leaves the original open
        except OSError:
            os.close(fd)  # not a socket
            continue
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if sock.type != socket.SOCK_STREAM:
                continue
            try:
                peer = sock.getpeername()[:2]
            except OSError:
                continue  # a listening socket
            nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            found.append(TcpSocket(sock.getsockname()[:2], peer, bool(nodelay)))
    return found


async def test_time_queued_for_a_free_connection_is_not_latency() -> None:
    """A poll that waited for its pool's only connection measures latency from when it left."""
    shown = f"{2:032x}"  # the trace id follow() gives signal 2, shown by FAST from the start
    slow_asked, release = asyncio.Event(), asyncio.Event()
    fast_arrived_ns: list[int] = []

    async def state(request: web.Request) -> web.Response:
        if request.match_info["vin"] == "SLOW":
            slow_asked.set()
            await release.wait()  # holds the hop's one connection until the test lets go
            return web.json_response({}, status=404)
        fast_arrived_ns.append(time.monotonic_ns())
        return web.json_response({"last_trace_id": shown})

    record = Record()
    record.expected = 1
    async with http_server({"/vehicles/{vin}": state}) as base:
        config = HttpPollHop(
            url=base + "/vehicles/{vin}",
            every="50ms",
            concurrency=1,
            timeout="10s",
            trace_id="$.last_trace_id",
        )
        async with observing(HttpPollObserver, config, record, within_s=10) as (tracker, _):
            follow(tracker, 1, "SLOW")
            async with asyncio.timeout(5):
                await slow_asked.wait()
            follow(tracker, 2, "FAST")  # its request queues behind SLOW's
            # The behaviour under test is a span of queueing: there is nothing to await but
            # time. FAST's state is shown all along; its request can only leave on release.
            await asyncio.sleep(1.0)
            released_ns = time.monotonic_ns()
            release.set()
            async with asyncio.timeout(5):
                await record.judged.wait()
    (fast,) = record.verdicts
    assert fast.trace_id == shown and fast.results[0] is HopResult.OK
    # The premise: FAST's request really waited in the queue for the one connection.
    assert fast_arrived_ns and fast_arrived_ns[0] >= released_ns
    latency_ns = fast.seen_ns[0] - fast.sent_ns
    queued_ns = released_ns - fast.sent_ns  # at least 1 s: a latency with the queue is more
    # What is left is one poll interval (50 ms) plus a loopback round trip; half the queueing
    # (>= 500 ms) leaves a busy shared machine ten intervals of slack.
    assert 0 <= latency_ns < queued_ns / 2, (latency_ns / MS, queued_ns / MS)


async def test_a_url_is_polled_only_while_a_signal_waits_on_it() -> None:
    """After its signal is seen or timed out, a URL gets no more requests."""
    seen, lost = f"{1:032x}", f"{2:032x}"
    arrivals: list[str] = []  # the vehicle of each request, in the order they arrived
    asked_thrice = {"STAY1": asyncio.Event(), "STAY2": asyncio.Event()}

    async def state(request: web.Request) -> web.Response:
        vin = request.match_info["vin"]
        arrivals.append(vin)
        if vin in asked_thrice and arrivals.count(vin) == 3:
            asked_thrice[vin].set()
        if vin == "SEEN":
            return web.json_response({"last_trace_id": seen})
        return web.json_response({}, status=404)

    async def rounds_after_now(n: int, stay: str) -> list[str]:
        """Follow signal ``n`` on URL ``stay`` and return the requests that arrived from its
        first one to its third. Its first round started after now; its three requests span
        two more full rounds (a URL is asked again only once its last answer came)."""
        follow(tracker, n, stay)
        async with asyncio.timeout(10):
            await asked_thrice[stay].wait()
        return arrivals[arrivals.index(stay) :]

    record = Record()
    record.expected = 1
    async with http_server({"/vehicles/{vin}": state}) as base:
        config = HttpPollHop(url=base + "/vehicles/{vin}", every="50ms", trace_id="$.last_trace_id")
        async with observing(HttpPollObserver, config, record, within_s=1.0) as (tracker, _):
            follow(tracker, 1, "SEEN")  # shown at once; its deadline is still 1 s away
            follow(tracker, 2, "LOST")  # never shown: times out after 1 s
            async with asyncio.timeout(10):
                await record.judged.wait()
            after_seen = await rounds_after_now(3, "STAY1")
            record.judged.clear()  # now wait for the second verdict (it may be in already)
            record.expected = 2
            if len(record.verdicts) < 2:
                async with asyncio.timeout(10):
                    await record.judged.wait()
            after_timeout = await rounds_after_now(4, "STAY2")
    results = {s.trace_id: s.results[0] for s in record.verdicts}
    assert (results[seen], results[lost]) == (HopResult.OK, HopResult.TIMEOUT)
    # The premise: a waiting URL is asked again and again (LOST for a whole second).
    assert arrivals.count("SEEN") >= 1 and arrivals.count("LOST") >= 3
    # Once SEEN was seen, only URLs with a waiting signal: STAY1's and LOST's (still waiting).
    assert set(after_seen) <= {"LOST", "STAY1"}, after_seen
    # Once LOST timed out, neither it nor SEEN (STAY1's signal may wait a little longer).
    assert set(after_timeout) - {"STAY1"} == {"STAY2"}, after_timeout


@needs_proc_fds
async def test_the_mqtt_session_socket_sets_tcp_nodelay(broker: BrokerTarget) -> None:
    """The MQTT session's connection to the broker has TCP_NODELAY on."""

    def to_broker() -> set[TcpSocket]:
        return {s for s in connected_tcp_sockets() if s.peer[1] == broker.port}

    before = to_broker()
    async with MqttSession(broker):
        session_sockets = to_broker() - before
    assert len(session_sockets) == 1, session_sockets
    assert all(s.nodelay for s in session_sockets), session_sockets


@needs_proc_fds
async def test_the_http_client_sockets_set_tcp_nodelay() -> None:
    """Each pooled connection of the HTTP client has TCP_NODELAY on."""
    clients: list[tuple[str, int]] = []
    both_arrived = asyncio.Event()

    async def hello(request: web.Request) -> web.Response:
        clients.append(request.transport.get_extra_info("peername")[:2])  # type: ignore[union-attr]
        if len(clients) == 2:
            both_arrived.set()
        await both_arrived.wait()  # two requests at once: two connections of the pool
        return web.Response(text="ok")

    async with http_server({"/": hello}) as base, HttpClient(concurrency=2) as client:
        async with asyncio.timeout(10):
            responses = await asyncio.gather(
                client.request("GET", base + "/"), client.request("GET", base + "/")
            )
        # Both connections are kept alive in the pool: read them as they are now.
        server = ("127.0.0.1", int(base.rsplit(":", 1)[1]))
        client_sockets = [
            s for s in connected_tcp_sockets() if s.peer == server and s.local in clients
        ]
    assert [r.status for r in responses] == [200, 200]
    assert len(set(clients)) == 2 and len(client_sockets) == 2, (clients, client_sockets)
    assert all(s.nodelay for s in client_sockets), client_sockets


async def accepted_socket_after_one_request(port: int, request: bytes) -> TcpSocket:
    """Send ``request`` to 127.0.0.1:port on a new connection, read the status line, and
    return the server's end of that (kept-alive) connection."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            status = await reader.readline()
            assert status.startswith(b"HTTP/1.1 2"), status
            local = writer.get_extra_info("sockname")[:2]
            (accepted,) = [s for s in connected_tcp_sockets() if s.peer == local]
            return accepted
        finally:
            writer.close()
            await writer.wait_closed()


@needs_proc_fds
async def test_fleetprobes_servers_set_tcp_nodelay_on_accepted_sockets() -> None:
    """The webhook receiver and /metrics set TCP_NODELAY on the connections they accept."""
    record = Record()
    config = WebhookHop(path="/hooks/t")
    async with observing(WebhookObserver, config, record) as (_, observer):
        webhook = await accepted_socket_after_one_request(
            observer.port,
            b"POST /hooks/t HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}",
        )
    runner, port = await serve(make_metrics_app(CollectorRegistry()), "127.0.0.1", 0)
    try:
        metrics = await accepted_socket_after_one_request(
            port, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
    finally:
        await runner.cleanup()
    assert webhook.local == ("127.0.0.1", observer.port) and webhook.nodelay, webhook
    assert metrics.local == ("127.0.0.1", port) and metrics.nodelay, metrics
