"""The run's HTTP endpoint: ``/metrics`` for Prometheus and ``/healthz``."""

from __future__ import annotations

import asyncio
import os

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from transport.errors import FleetprobeError


def make_metrics_app(registry: CollectorRegistry) -> web.Application:
    """An aiohttp application serving ``registry``.

    Rendering runs in a worker thread: with the stock client it costs about 20 ms for a
    hundred label sets, which would otherwise stall the loop that timestamps marks.
    """

    async def metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = await asyncio.get_running_loop().run_in_executor(None, encoder, registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


class ListenError(FleetprobeError):
    """A server could not bind its address (in use, not local, not permitted)."""


async def serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start ``app`` on host:port (0 = any free port); return the runner and the bound port.

    Raises:
        ListenError: the address cannot be bound.
    """
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise ListenError(f"cannot listen on {host}:{port}: {reason}") from None
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
