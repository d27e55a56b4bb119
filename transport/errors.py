"""The project's exception tree.

::

    FleetprobeError                 anything fleetprobe raises on purpose
    └── TransportError              talking to a peer failed; ``reason`` is a metric label
        ├── ConnectError            the peer could not be reached (refused, DNS, TLS, timeout)
        │   └── NotAuthorizedError  the broker refused the credentials (fatal, no retry)
        └── SendError               a message could not be handed over

The scenario loader adds ``ScenarioError`` (in ``fleetprobe.scenario``) under
``FleetprobeError``. A failed hop is never an exception: it is a result in the tracker.
"""

from __future__ import annotations


class FleetprobeError(Exception):
    """Base of every error fleetprobe raises on purpose."""


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
