"""Start aiohttp servers: the /metrics endpoint, the webhook receiver, the testbed."""

from __future__ import annotations

import ipaddress
import logging
import os

from aiohttp import web

from fleetprobe.core.errors import FleetprobeError

log = logging.getLogger("fleetprobe")


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


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``): only this machine reaches it."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def warn_if_open(what: str, host: str, port: int) -> None:
    """Log a warning when ``what``, a server that asks no one for credentials, listens
    beyond loopback: anyone who reaches the address may use it."""
    if not is_loopback(host):
        log.warning(
            "%s listens on %s:%d without authentication: anyone who can reach that address "
            "can use it (bind 127.0.0.1 unless that is what you want)",
            what,
            host,
            port,
        )


def split_listen(listen: str) -> tuple[str, int]:
    """``127.0.0.1:9464`` as host and port.

    Raises:
        ValueError: ``listen`` is not HOST:PORT with a port from 0 to 65535.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{listen!r} is not HOST:PORT (like 127.0.0.1:9464)")
    return host.strip("[]"), int(port)
