"""Connections to the outside world: the MQTT and HTTP clients and the project's error tree.

:mod:`transport.mqtt` speaks MQTT over asyncio (its packets are in :mod:`transport.mqtt_codec`),
:mod:`transport.http` owns the aiohttp client sessions; both translate socket, TLS and
protocol errors into the exceptions of :mod:`transport.errors`, each with a bounded
``reason`` fit for a metric label.
"""

from transport.errors import (
    ConnectError,
    FleetprobeError,
    NotAuthorizedError,
    SendError,
    TransportError,
)

__all__ = [
    "ConnectError",
    "FleetprobeError",
    "NotAuthorizedError",
    "SendError",
    "TransportError",
]
