"""Errors of talking to peers: the ``TransportError`` branch of the tree drawn in
:mod:`fleetprobe.core.errors`."""

from __future__ import annotations

from fleetprobe.core.errors import FleetprobeError


class TransportError(FleetprobeError):
    """Talking to a peer failed.

    Attributes:
        reason: a short token from a bounded set (``refused``, ``timeout``, ``tls``, ...),
            safe to use as a metric label.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ConnectError(TransportError):
    """A peer could not be reached or refused the connection."""

    def __init__(self, url: str, detail: str, *, reason: str) -> None:
        super().__init__(f"cannot connect to {url}: {detail}", reason=reason)
        self.url = url


class NotAuthorizedError(ConnectError):
    """The broker refused the credentials; retrying would not help."""


class SendError(TransportError):
    """A message could not be handed over to the peer."""
