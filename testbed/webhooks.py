"""The testbed's webhook sender: POSTs each processed event to the configured targets.

The body is ``{"event": "vehicle.state", "vin", "trace_id", "signal", "state"}``; the
request carries a W3C ``traceparent`` with the signal's trace id and, when the target has
a secret, a GitHub-style signature header (``sha256=<hex HMAC-SHA256 of the raw body>``).
Sending never blocks the processor: each delivery is a task under the webhooks stage's
knobs, in a bounded set. Failures are counted by reason and logged, never raised.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from fleetprobe.core.trace_ids import normalize_trace_id
from fleetprobe.testbed.events import signal_of, trace_id_of
from fleetprobe.testbed.knobs import StageKnobs
from fleetprobe.testbed.stage import Counters, StageRunner
from fleetprobe.transport.http import HttpClient, HttpError

log = logging.getLogger(__name__)

STAGE = "webhooks"
EVENT_TYPE = "vehicle.state"
SIGNATURE_PREFIX = "sha256="
DEFAULT_MAX_IN_FLIGHT = 1000


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """Where to POST events, and how to sign them.

    Attributes:
        url: the http(s) URL to POST to.
        signals: the signals to send (by ``meta.signal``); None sends all.
        secret: the HMAC-SHA256 key; unsigned when None. Never in ``repr``.
        signature_header: the header that carries ``sha256=<hex>``.
    """

    url: str
    signals: tuple[str, ...] | None = None
    secret: str | None = field(default=None, repr=False)
    signature_header: str = "X-Hub-Signature-256"

    def wants(self, signal: str | None) -> bool:
        """Whether events of ``signal`` go to this target."""
        return self.signals is None or signal in self.signals


def redact_url(url: str) -> str:
    """``url`` without credentials or query, either of which may hold a token; for logs."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def sign(secret: str, body: bytes) -> str:
    """The GitHub-style signature of ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return SIGNATURE_PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def traceparent(trace_id: str | None) -> str | None:
    """A W3C ``traceparent`` for the trace with a new span id; None for a malformed id."""
    normalized = normalize_trace_id(trace_id)
    if normalized is None:
        return None
    span_id = secrets.token_hex(8)
    while span_id == "0" * 16:  # all zeros is invalid (W3C); one draw in 2**64
        span_id = secrets.token_hex(8)
    return f"00-{normalized}-{span_id}-01"


class WebhookSender:
    """Delivers enriched events to webhook targets; use as an async context manager.

    Args:
        targets: where to POST.
        knobs: the webhooks stage's faults, applied to every delivery (one event to one
            target); new knobs seeded with ``seed`` when None.
        counters: where ``sent``, ``dropped``, ``backlog_full`` and ``failed_<reason>`` are
            counted (a private :class:`Counters` when None).
        max_in_flight: deliveries pending at most; past it a delivery is dropped and counted.
        timeout_s: the time one POST may take.
        seed: seeds the knobs' random draws when ``knobs`` is None.
    """

    def __init__(
        self,
        targets: Sequence[WebhookTarget] = (),
        knobs: StageKnobs | None = None,
        *,
        counters: Counters | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        timeout_s: float = 5.0,
        seed: int | None = None,
    ) -> None:
        self.targets = tuple(targets)
        self.knobs = knobs if knobs is not None else StageKnobs(seed=seed)
        self.counters = counters if counters is not None else Counters()
        self._stage = StageRunner(STAGE, self.knobs, self.counters, backlog=max_in_flight)
        self._client = HttpClient(timeout_s=timeout_s)
        self._open = False

    async def __aenter__(self) -> WebhookSender:
        await self._client.__aenter__()
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        try:
            await self._stage.aclose()
        finally:
            await self._client.__aexit__(exc_type, exc, tb)

    def submit(self, vin: str, event: dict[str, Any]) -> None:
        """Schedule the event's delivery to every target that wants its signal."""
        if not self._open:
            raise RuntimeError("WebhookSender used outside 'async with'")
        signal = signal_of(event)
        targets = [target for target in self.targets if target.wants(signal)]
        if not targets:
            return
        trace_id = trace_id_of(event)
        body = json.dumps(
            {
                "event": EVENT_TYPE,
                "vin": vin,
                "trace_id": trace_id,
                "signal": signal,
                "state": event,
            }
        ).encode()
        for target in targets:

            async def deliver(target: WebhookTarget = target) -> None:
                await self._deliver(target, body, trace_id)

            self._stage.submit(deliver)

    async def _deliver(self, target: WebhookTarget, body: bytes, trace_id: str | None) -> None:
        headers = {"Content-Type": "application/json"}
        parent = traceparent(trace_id)
        if parent is not None:
            headers["traceparent"] = parent
        if target.secret is not None:
            headers[target.signature_header] = sign(target.secret, body)
        try:
            response = await self._client.request("POST", target.url, headers=headers, body=body)
        except HttpError as error:
            self._failed(target, error.reason, str(error))
            return
        if not 200 <= response.status < 300:
            self._failed(target, f"http_{response.status}", f"answered {response.status}")
            return
        self.counters.add(STAGE, "sent")

    def _failed(self, target: WebhookTarget, reason: str, detail: str) -> None:
        self.counters.add(STAGE, f"failed_{reason}")
        safe = redact_url(target.url)
        log.warning("webhook to %s failed (%s): %s", safe, reason, detail.replace(target.url, safe))
