"""Connections to the outside world: the MQTT and HTTP clients and the servers.

:mod:`fleetprobe.transport.mqtt` speaks MQTT over asyncio (its packets are in
:mod:`fleetprobe.transport.mqtt_codec`), :mod:`fleetprobe.transport.http` owns the aiohttp
client sessions; both translate socket, TLS and protocol errors into the exceptions of
:mod:`fleetprobe.transport.errors`, each with a bounded ``reason`` fit for a metric label.
"""

from fleetprobe.transport.errors import (
    ConnectError,
    NotAuthorizedError,
    SendError,
    TransportError,
)

__all__ = [
    "ConnectError",
    "NotAuthorizedError",
    "SendError",
    "TransportError",
]
