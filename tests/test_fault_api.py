"""The fault proxy's Toxiproxy-compatible API, spoken to as Toxiproxy's users do."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import toxiproxy  # type: ignore[import-untyped]

from conftest import echo, finish, fleetprobe
from fleetprobe.faults.api import make_app
from fleetprobe.faults.proxy import ProxySet
from fleetprobe.testbed.mosquitto import free_port
from fleetprobe.transport.servers import serve, split_listen


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.fixture
async def api() -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    """The API in this loop, and a client session for it."""
    runner, port = await serve(make_app(ProxySet(seed=3)), "127.0.0.1", 0)
    async with aiohttp.ClientSession() as session:
        yield f"http://127.0.0.1:{port}", session
    await runner.cleanup()


async def call(
    api: tuple[str, aiohttp.ClientSession], method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    base, session = api
    async with session.request(method, base + path, json=body) as response:
        text = await response.text()
        return response.status, (json.loads(text) if text else None)


async def round_trip_ms(listen: str) -> float:
    host, port = split_listen(listen)
    reader, writer = await asyncio.open_connection(host, port)
    start = time.perf_counter()
    writer.write(b"ping")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    elapsed = (time.perf_counter() - start) * 1000
    writer.close()
    return elapsed


async def test_the_toxiproxy_python_client_drives_fleetprobe_proxy(
    tmp_path: Path, echo_port: int
) -> None:
    """toxiproxy-python, unchanged, against the `fleetprobe proxy` command."""
    api_port = free_port()
    process = await fleetprobe("proxy", "--api", f"127.0.0.1:{api_port}", cwd=tmp_path)
    try:
        assert process.stderr is not None
        async with asyncio.timeout(20):
            while b"fault proxy API on" not in await process.stderr.readline():
                pass

        def create() -> Any:
            client = toxiproxy.Toxiproxy()
            client.update_api_consumer("127.0.0.1", api_port)
            proxy = client.create(upstream=f"127.0.0.1:{echo_port}", name="echo")
            proxy.add_toxic(type="latency", attributes={"latency": 150})
            return client, proxy

        client, proxy = await asyncio.to_thread(create)
        assert proxy.listen.startswith("127.0.0.1:") and not proxy.listen.endswith(":0")
        assert await round_trip_ms(proxy.listen) >= 150
        toxics = await asyncio.to_thread(proxy.toxics)
        assert list(toxics) == ["latency_downstream"]
        assert toxics["latency_downstream"].attributes == {"latency": 150, "jitter": 0}

        await asyncio.to_thread(proxy.destroy_toxic, "latency_downstream")
        assert await round_trip_ms(proxy.listen) < 100
        await asyncio.to_thread(proxy.disable)
        with pytest.raises(ConnectionRefusedError):
            await round_trip_ms(proxy.listen)
        await asyncio.to_thread(proxy.enable)
        assert await round_trip_ms(proxy.listen) < 100
        with pytest.raises(toxiproxy.exceptions.ProxyExists):
            await asyncio.to_thread(client.create, upstream="127.0.0.1:1", name="echo")
        assert await asyncio.to_thread(client.reset)
        assert b'"version"' in await asyncio.to_thread(client.version)
        await asyncio.to_thread(proxy.destroy)
        assert await asyncio.to_thread(client.proxies) == {}
    finally:
        process.send_signal(signal.SIGTERM)
        code, _, err = await finish(process, 20)
    assert code == 0, err


async def test_the_documented_requests_and_their_answers(
    api: tuple[str, aiohttp.ClientSession], echo_port: int
) -> None:
    """Requests as Toxiproxy's README writes them; answers as Toxiproxy 2.12 gives them."""
    upstream = f"127.0.0.1:{echo_port}"
    status, proxy = await call(
        api, "POST", "/proxies", {"name": "redis", "listen": "127.0.0.1:0", "upstream": upstream}
    )
    assert status == 201
    assert proxy["name"] == "redis" and proxy["enabled"] is True and proxy["toxics"] == []
    assert await call(api, "POST", "/proxies", {"name": "redis", "upstream": upstream}) == (
        409,
        {"error": "proxy already exists", "status": 409},
    )
    assert await call(api, "POST", "/proxies", {"name": "x"}) == (
        400,
        {"error": "missing required field: upstream", "status": 400},
    )
    assert await call(api, "GET", "/proxies/nope") == (
        404,
        {"error": "proxy not found", "status": 404},
    )

    latency = {"type": "latency", "attributes": {"latency": 1000, "jitter": 50}}
    status, toxic = await call(api, "POST", "/proxies/redis/toxics", latency)
    assert status == 200
    assert toxic == {
        "attributes": {"latency": 1000, "jitter": 50},
        "name": "latency_downstream",
        "type": "latency",
        "stream": "downstream",
        "toxicity": 1.0,
    }
    assert (await call(api, "POST", "/proxies/redis/toxics", latency))[0] == 409
    status, error = await call(api, "POST", "/proxies/redis/toxics", {"type": "lag"})
    assert (status, error["error"]) == (400, "invalid toxic type")
    status, error = await call(
        api, "POST", "/proxies/redis/toxics", {"type": "latency", "stream": "sideways"}
    )
    assert (status, error["error"]) == (
        400,
        "stream was invalid, can be either upstream or downstream",
    )
    status, error = await call(
        api, "POST", "/proxies/redis/toxics", {"type": "slicer", "attributes": {}}
    )
    assert status == 400 and "average_size" in error["error"]

    # An update merges: jitter stays when only latency changes.
    status, toxic = await call(
        api, "POST", "/proxies/redis/toxics/latency_downstream", {"attributes": {"latency": 5}}
    )
    assert (status, toxic["attributes"]) == (200, {"latency": 5, "jitter": 50})
    assert (await call(api, "GET", "/proxies/redis/toxics"))[1] == [toxic]
    assert await call(api, "DELETE", "/proxies/redis/toxics/latency_downstream") == (204, None)
    assert await call(api, "GET", "/proxies/redis/toxics/latency_downstream") == (
        404,
        {"error": "toxic not found", "status": 404},
    )

    status, proxy = await call(api, "POST", "/proxies/redis", {"enabled": False})
    assert (status, proxy["enabled"]) == (200, False)
    with pytest.raises(ConnectionRefusedError):
        await round_trip_ms(proxy["listen"])
    assert await call(api, "POST", "/reset") == (204, None)
    assert (await call(api, "GET", "/proxies"))[1]["redis"]["enabled"] is True

    status, body = await call(
        api,
        "POST",
        "/populate",
        [{"name": "redis", "upstream": upstream}, {"name": "web", "upstream": upstream}],
    )
    assert status == 201 and [p["name"] for p in body["proxies"]] == ["redis", "web"]
    assert body["proxies"][0] == (await call(api, "GET", "/proxies/redis"))[1]
    status, body = await call(api, "POST", "/populate", [{"name": "db"}])
    assert (status, body["error"]) == (400, "missing required field: upstream at proxy 1")
    assert await call(api, "DELETE", "/proxies/web") == (204, None)
    assert sorted((await call(api, "GET", "/proxies"))[1]) == ["redis"]
    assert (await call(api, "GET", "/version"))[1] == {"version": "2.12.0"}


async def test_bad_json_is_a_400_with_toxiproxy_error_body(
    api: tuple[str, aiohttp.ClientSession],
) -> None:
    base, session = api
    async with session.post(base + "/proxies", data=b"{bad") as response:
        assert response.status == 400
        body = await response.json(content_type=None)
    assert body["status"] == 400 and body["error"].startswith("bad request body:")


async def test_deeply_nested_json_is_a_400_not_a_crash(
    api: tuple[str, aiohttp.ClientSession],
) -> None:
    """100,000 nested lists: a 400 saying so, not a 500 from a RecursionError."""
    base, session = api
    async with session.post(base + "/proxies", data=b"[" * 100_000 + b"]" * 100_000) as response:
        assert response.status == 400
        body = await response.json(content_type=None)
    assert body["error"] == "bad request body: nested too deeply"


async def test_a_port_in_use_is_a_500_naming_the_address(
    api: tuple[str, aiohttp.ClientSession], echo_port: int
) -> None:
    taken = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = taken.sockets[0].getsockname()[1]
    status, body = await call(
        api,
        "POST",
        "/proxies",
        {"name": "p", "listen": f"127.0.0.1:{port}", "upstream": f"127.0.0.1:{echo_port}"},
    )
    taken.close()
    assert status == 500
    assert body["error"].startswith(f"listen tcp 127.0.0.1:{port}: bind: address already in use")


async def test_browsers_are_refused_as_by_toxiproxy(
    api: tuple[str, aiohttp.ClientSession],
) -> None:
    """A web page must not drive a local proxy API through the user's browser."""
    base, session = api
    browser = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0"}
    async with session.post(base + "/reset", headers=browser) as response:
        assert response.status == 403
        assert await response.text() == "User agent not allowed\n"
