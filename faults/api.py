"""An HTTP API compatible with Toxiproxy's, so its clients and scripts drive our proxy.

Same paths, JSON shapes, status codes and error bodies (``{"error": ..., "status": N}``)
as Toxiproxy 2.12 for the endpoints people script against. ``/version`` reports the
Toxiproxy API version this server is compatible with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from fleetprobe.faults.proxy import ProxyError, ProxySet
from fleetprobe.faults.toxics import ToxicSpec
from fleetprobe.transport.servers import serve, split_listen, warn_if_open

log = logging.getLogger("fleetprobe.faults")

TOXIPROXY_API_VERSION = "2.12.0"
"""The Toxiproxy release whose API this one follows."""

_PROXIES = web.AppKey("proxies", ProxySet)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(proxies: ProxySet) -> web.Application:
    """The API over ``proxies``."""
    app = web.Application(middlewares=[_errors_as_toxiproxy_does])
    app[_PROXIES] = proxies
    app.add_routes(
        [
            web.get("/proxies", _list_proxies),
            web.post("/proxies", _create_proxy),
            web.post("/populate", _populate),
            web.get("/proxies/{proxy}", _show_proxy),
            web.post("/proxies/{proxy}", _update_proxy),
            web.patch("/proxies/{proxy}", _update_proxy),
            web.delete("/proxies/{proxy}", _delete_proxy),
            web.get("/proxies/{proxy}/toxics", _list_toxics),
            web.post("/proxies/{proxy}/toxics", _create_toxic),
            web.get("/proxies/{proxy}/toxics/{toxic}", _show_toxic),
            web.post("/proxies/{proxy}/toxics/{toxic}", _update_toxic),
            web.patch("/proxies/{proxy}/toxics/{toxic}", _update_toxic),
            web.delete("/proxies/{proxy}/toxics/{toxic}", _delete_toxic),
            web.post("/reset", _reset),
            web.get("/version", _version),
        ]
    )
    app.on_cleanup.append(_close_proxies)
    return app


def _error_body(message: str, status: int, **extra: Any) -> web.Response:
    # Toxiproxy writes its JSON errors with Go's http.Error: text/plain, newline-terminated.
    body = json.dumps({"error": message, "status": status, **extra}, separators=(",", ":"))
    return web.Response(status=status, text=body + "\n", content_type="text/plain")


@web.middleware
async def _errors_as_toxiproxy_does(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.headers.get("User-Agent", "").startswith("Mozilla/"):
        # As Toxiproxy: a web page must not reach a local API through the user's browser.
        return web.Response(status=403, text="User agent not allowed\n")
    try:
        return await handler(request)
    except ProxyError as error:
        if request.path == "/populate" and error.status != 400:
            return _error_body(
                error.message, error.status, proxies=[p.to_json() for p in error.done]
            )
        return _error_body(error.message, error.status)


async def _body(request: web.Request, expected: type) -> Any:
    try:
        body = json.loads(await request.read() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProxyError(f"bad request body: {error}", 400) from None
    except RecursionError:
        raise ProxyError("bad request body: nested too deeply", 400) from None
    if not isinstance(body, expected):
        raise ProxyError(f"bad request body: expected a JSON {expected.__name__}", 400)
    return body


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def _proxies(request: web.Request) -> ProxySet:
    return request.app[_PROXIES]


async def _list_proxies(request: web.Request) -> web.Response:
    proxies = _proxies(request).proxies
    return _json({name: proxies[name].to_json() for name in sorted(proxies)})


async def _create_proxy(request: web.Request) -> web.Response:
    body = await _body(request, dict)
    proxy = await _proxies(request).create(
        str(body.get("name") or ""),
        str(body.get("listen") or ""),
        str(body.get("upstream") or ""),
        enabled=bool(body.get("enabled", True)),
    )
    return _json(proxy.to_json(), 201)


async def _populate(request: web.Request) -> web.Response:
    items = await _body(request, list)
    if not all(isinstance(item, dict) for item in items):
        raise ProxyError("bad request body: each proxy must be a JSON object", 400)
    done = await _proxies(request).populate(items)
    return _json({"proxies": [proxy.to_json() for proxy in done]}, 201)


async def _show_proxy(request: web.Request) -> web.Response:
    return _json(_proxies(request).get(request.match_info["proxy"]).to_json())


async def _update_proxy(request: web.Request) -> web.Response:
    proxies = _proxies(request)
    proxies.get(request.match_info["proxy"])  # 404 before the body is read, as Toxiproxy
    body = await _body(request, dict)
    enabled = body.get("enabled")
    proxy = await proxies.update(
        request.match_info["proxy"],
        listen=body.get("listen"),
        upstream=body.get("upstream"),
        enabled=None if enabled is None else bool(enabled),
    )
    return _json(proxy.to_json())


async def _delete_proxy(request: web.Request) -> web.Response:
    await _proxies(request).delete(request.match_info["proxy"])
    return web.Response(status=204)


async def _list_toxics(request: web.Request) -> web.Response:
    proxy = _proxies(request).get(request.match_info["proxy"])
    return _json(proxy.to_json()["toxics"])


async def _create_toxic(request: web.Request) -> web.Response:
    proxy = _proxies(request).get(request.match_info["proxy"])
    body = await _body(request, dict)
    try:
        spec = ToxicSpec.model_validate(body)
    except ValidationError as error:
        raise ProxyError(_toxic_problem(error), 400) from None
    return _json(proxy.add_toxic(spec).model_dump())


def _toxic_problem(error: ValidationError) -> str:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    if field == "stream":
        return "stream was invalid, can be either upstream or downstream"
    if field == "type":
        return "invalid toxic type"
    return f"bad request body: {field}: {first['msg']}"


async def _show_toxic(request: web.Request) -> web.Response:
    proxy = _proxies(request).get(request.match_info["proxy"])
    return _json(proxy.toxic(request.match_info["toxic"]).model_dump())


async def _update_toxic(request: web.Request) -> web.Response:
    proxy = _proxies(request).get(request.match_info["proxy"])
    proxy.toxic(request.match_info["toxic"])
    body = await _body(request, dict)
    return _json(proxy.update_toxic(request.match_info["toxic"], body).model_dump())


async def _delete_toxic(request: web.Request) -> web.Response:
    proxy = _proxies(request).get(request.match_info["proxy"])
    proxy.remove_toxic(request.match_info["toxic"])
    return web.Response(status=204)


async def _reset(request: web.Request) -> web.Response:
    await _proxies(request).reset()
    return web.Response(status=204)


async def _version(_request: web.Request) -> web.Response:
    body = json.dumps({"version": TOXIPROXY_API_VERSION}) + "\n"
    return web.Response(text=body, content_type="application/json", charset="utf-8")


async def _close_proxies(app: web.Application) -> None:
    await app[_PROXIES].close()


async def serve_until_stopped(listen: str, proxies: ProxySet) -> None:
    """Serve the API on ``listen`` (HOST:PORT) until SIGINT or SIGTERM.

    Raises:
        transport.servers.ListenError: the address cannot be bound.
    """
    host, port = split_listen(listen)
    runner, bound = await serve(make_app(proxies), host, port)
    warn_if_open("the proxy API", host, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop.set)
    log.info("fault proxy API on %s:%d (Toxiproxy %s)", host, bound, TOXIPROXY_API_VERSION)
    try:
        await stop.wait()
    finally:
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(number)
        await runner.cleanup()
