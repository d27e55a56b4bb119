"""The ``webhook`` hop: the platform calls fleetprobe back with the signal's trace id.

One aiohttp server (``exporters.webhook_receiver.listen``, 127.0.0.1 by default) takes a
POST route per hop path. It answers at once (204) and only reports marks to the tracker,
which never blocks. With a ``secret``, the body must carry a GitHub-style signature
(``sha256=<hex HMAC-SHA256 of the raw body>``); a missing or bad one gets 401, is counted,
and is never matched. Bodies over ``max_body`` get 413.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import defaultdict
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import Field, SecretStr, field_validator, model_validator

from fleetprobe.probes.json_paths import PathText
from fleetprobe.probes.observers.base import HopConfig, Observer, ObserverContext, WatchedHop
from fleetprobe.probes.trace_ids import TraceIdReader, Unmatched, one_source, parse_json
from fleetprobe.transport.servers import serve, warn_if_open

SIGNATURE_PREFIX = "sha256="


class WebhookHop(HopConfig):
    """``webhook: {path: /hooks/x, trace_id: $.path | header: NAME, secret: ${ENV}}``."""

    path: str
    trace_id: PathText | None = None
    header: str | None = None
    secret: SecretStr | None = None
    signature_header: str = "X-Hub-Signature-256"
    max_body: int = Field(1 << 20, ge=1, le=64 << 20)

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, path: str) -> str:
        if not path.startswith("/") or "{" in path or "?" in path:
            raise ValueError("must be an absolute path like /hooks/telemetry (no placeholders)")
        return path

    @model_validator(mode="after")
    def _one_trace_id_source(self) -> WebhookHop:
        one_source(self.trace_id, self.header, "header")
        return self

    @property
    def receives_webhooks(self) -> bool:
        return True


class _Route:
    __slots__ = ("chain_index", "config", "hop_index", "trace_id")

    def __init__(self, hop: WatchedHop) -> None:
        self.config: WebhookHop = hop.config
        self.chain_index, self.hop_index = hop.chain_index, hop.hop_index
        self.trace_id = TraceIdReader(self.config.trace_id, self.config.header)


class WebhookObserver(Observer, kind="webhook", config=WebhookHop):
    """Serves every webhook hop's path and marks what the platform posts."""

    def __init__(self, hops: list[WatchedHop], context: ObserverContext) -> None:
        super().__init__(hops, context)
        self._routes: dict[str, list[_Route]] = defaultdict(list)
        for hop in self.hops:
            self._routes[hop.config.path].append(_Route(hop))
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        max_body = max(
            route.config.max_body for routes in self._routes.values() for route in routes
        )
        app = web.Application(client_max_size=max_body)
        for path in self._routes:
            app.router.add_post(path, self._receive)
        host, port = self.context.webhook_listen
        self._runner, self.port = await serve(app, host, port)
        unsigned = sorted(p for p, routes in self._routes.items() if not routes[0].config.secret)
        if unsigned:
            what = f"the webhook receiver ({', '.join(unsigned)} without a secret)"
            warn_if_open(what, host, port)

    async def run(self) -> None:
        # The server runs on its own; this task only keeps the observer alive until cancelled.
        await asyncio.Event().wait()

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        seen_ns = time.monotonic_ns()
        routes = self._routes[request.path]
        errors = self.context.events.hop_error
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            for route in routes:
                errors(route.chain_index, route.hop_index, "too_large")
            raise
        except (ConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError):
            # The caller went away mid-body: a refused call of its own, not the receiver's.
            for route in routes:
                errors(route.chain_index, route.hop_index, "incomplete")
            return web.Response(status=400)
        body: Any = parse_json(raw)
        accepted = False
        for route in routes:
            too_large = len(raw) > route.config.max_body  # the server allows the largest limit
            refusal = "too_large" if too_large else _signature_refusal(route.config, request, raw)
            if refusal is not None:
                errors(route.chain_index, route.hop_index, refusal)
                continue
            accepted = True
            try:
                trace_id = route.trace_id.read(body, request.headers.items())
            except Unmatched as unmatched:
                self.context.tracker.unmatched(route.chain_index, route.hop_index, unmatched.reason)
                continue
            self.context.tracker.observe(
                route.chain_index, route.hop_index, trace_id, seen_ns, body
            )
        if not accepted:
            if len(raw) > min(route.config.max_body for route in routes):
                raise web.HTTPRequestEntityTooLarge(
                    max_size=min(route.config.max_body for route in routes), actual_size=len(raw)
                )
            raise web.HTTPUnauthorized(text="bad or missing signature\n")
        return web.Response(status=204)


def _signature_refusal(config: WebhookHop, request: web.Request, raw: bytes) -> str | None:
    """None when the call is signed right (or no secret is set), else the reason."""
    if config.secret is None:
        return None
    given = request.headers.get(config.signature_header)
    if not given:
        return "missing_signature"
    key = config.secret.get_secret_value().encode()
    expected = SIGNATURE_PREFIX + hmac.new(key, raw, hashlib.sha256).hexdigest()
    # Bytes outside ASCII in the header (decoded with surrogates) cannot match a hex digest.
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    return None if hmac.compare_digest(given_bytes, expected.encode()) else "bad_signature"
