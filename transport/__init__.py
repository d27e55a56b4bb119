"""Connections to the outside world: the MQTT client boundary and the project's error tree.

aiomqtt is imported in :mod:`transport.mqtt` only; its errors are translated there into the
exceptions of :mod:`transport.errors`, each with a bounded ``reason`` fit for a metric label.
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
