"""Start aiohttp servers: the /metrics endpoint, the webhook receiver, the testbed."""

from __future__ import annotations

import os

from aiohttp import web

from fleetprobe.core.errors import FleetprobeError


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


def split_listen(listen: str) -> tuple[str, int]:
    """``127.0.0.1:9464`` as host and port.

    Raises:
        ValueError: ``listen`` is not HOST:PORT with a port from 0 to 65535.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{listen!r} is not HOST:PORT (like 127.0.0.1:9464)")
    return host.strip("[]"), int(port)
