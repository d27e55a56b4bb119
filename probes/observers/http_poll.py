"""The ``http_poll`` hop: a REST resource (a state API) shows the signal's trace id.

For every hop, the observer polls each URL that a pending signal needs once per ``every``
(coalescing: one request per URL per interval, however many signals wait on it), and
reports a sighting when the trace id a URL shows changes. 404, 503, other errors and
bodies without the id are "not seen yet" and counted by reason, never a result.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from fleetprobe.core.durations import Duration
from fleetprobe.probes.json_paths import PathText
from fleetprobe.probes.observers.base import HopConfig, Observer, ObserverContext, WatchedHop
from fleetprobe.probes.trace_ids import TraceIdReader, Unmatched, one_source, parse_json
from fleetprobe.simulator.fleet import SIGNAL_FIELDS
from fleetprobe.simulator.templates import TextTemplate
from fleetprobe.transport.http import HttpClient, HttpError

MAX_REMEMBERED_URLS = 100_000


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token


class HttpPollHop(HopConfig):
    """``http_poll: {url: TEMPLATE, every: 200ms, trace_id: $.path | header: NAME, ...}``."""

    url: str
    every: Duration = Field(1.0, gt=0)
    trace_id: PathText | None = None
    header: str | None = None
    timeout: Duration = Field(2.0, gt=0)
    concurrency: int = Field(16, ge=1, le=1000)
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="sent with every poll; values are kept secret"
    )
    latest: bool = False
    ca: str | None = Field(
        None, description="a PEM file of the CAs that sign the API's certificate (https)"
    )

    @field_validator("url")
    @classmethod
    def _url_template(cls, url: str) -> str:
        TextTemplate(url, SIGNAL_FIELDS)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL with a host")
        if "{" in parts.scheme + parts.netloc:
            # A signal's values must never choose where requests go.
            raise ValueError("placeholders may stand in the path and query only, not the host")
        return url

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, headers: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, value in headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an HTTP header name")
            if any(c in value.get_secret_value() for c in "\r\n\0"):
                # Never echoed: the value may be a secret from ${ENV}.
                raise ValueError(f"the value of header {name!r} has a line break or NUL")
        return headers

    @model_validator(mode="after")
    def _one_trace_id_source(self) -> HttpPollHop:
        one_source(self.trace_id, self.header, "header")
        return self

    def template_fields(self) -> frozenset[str]:
        return TextTemplate(self.url, SIGNAL_FIELDS).fields

    def problems(
        self, mqtt_protocol: str, base_dir: Path | None
    ) -> Iterator[tuple[tuple[str, ...], str]]:
        if self.ca is None or base_dir is None:
            return
        try:
            ssl.create_default_context(cafile=str(base_dir / self.ca))
        except (OSError, ssl.SSLError) as error:
            yield ("ca",), f"cannot use {base_dir / self.ca} as CA certificates: {error}"

    def located(self, base_dir: Path) -> HttpPollHop:
        if self.ca is None:
            return self
        return self.model_copy(update={"ca": str(base_dir / self.ca)})

    def tls(self) -> ssl.SSLContext | None:
        """How the API's certificate is verified: against ``ca`` when given."""
        return None if self.ca is None else ssl.create_default_context(cafile=self.ca)

    @property
    def latest_only(self) -> bool:
        return self.latest


class _PolledHop:
    """One hop's polling state: its URL template and what each URL showed last."""

    def __init__(self, hop: WatchedHop) -> None:
        config: HttpPollHop = hop.config
        self.watched = hop
        self.config = config
        self.url = TextTemplate(config.url, SIGNAL_FIELDS)
        self.trace_id = TraceIdReader(config.trace_id, config.header)
        self.headers = {k: v.get_secret_value() for k, v in config.headers.items()} or None
        # url -> the trace id it showed last, kept after nobody waits on the URL (a state API
        # keeps showing it), bounded for URL templates that differ per signal.
        self.last_shown: OrderedDict[str, str] = OrderedDict()
        self.in_flight: set[str] = set()


class HttpPollObserver(Observer, kind="http_poll", config=HttpPollHop):
    """Polls every http_poll hop's URLs while signals are pending there."""

    def __init__(self, hops: list[WatchedHop], context: ObserverContext) -> None:
        super().__init__(hops, context)
        self._polled = [_PolledHop(hop) for hop in self.hops]
        self._clients = [
            HttpClient(
                concurrency=p.config.concurrency, timeout_s=p.config.timeout, tls=p.config.tls()
            )
            for p in self._polled
        ]
        self._entered: list[HttpClient] = []

    async def start(self) -> None:
        for client in self._clients:
            await client.__aenter__()
            self._entered.append(client)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for polled, client in zip(self._polled, self._clients, strict=True):
                group.create_task(self._poll_forever(polled, client))

    async def close(self) -> None:
        while self._entered:
            await self._entered.pop().__aexit__(None, None, None)

    async def _poll_forever(self, polled: _PolledHop, client: HttpClient) -> None:
        hop = polled.watched
        interval_ns = round(polled.config.every * 1e9)
        pending_tasks: set[asyncio.Task[None]] = set()
        next_ns = time.monotonic_ns()
        try:
            while True:
                urls = {
                    polled.url.render_text(signal.fields or {})
                    for signal in self.context.tracker.pending(hop.chain_index, hop.hop_index)
                }
                for url in urls - polled.in_flight:  # a slow URL is not asked twice at once
                    polled.in_flight.add(url)
                    task = asyncio.create_task(self._poll(polled, client, url))
                    pending_tasks.add(task)
                    task.add_done_callback(pending_tasks.discard)
                next_ns += interval_ns
                delay_ns = next_ns - time.monotonic_ns()
                if delay_ns < 0:  # fell behind (a stalled loop): do not burst to catch up
                    next_ns, delay_ns = time.monotonic_ns(), 0
                await asyncio.sleep(delay_ns / 1e9)
        finally:
            for task in pending_tasks:  # a poll must not outlive its client
                task.cancel()

    async def _poll(self, polled: _PolledHop, client: HttpClient, url: str) -> None:
        hop = polled.watched
        errors = self.context.events.hop_error
        asked_ns = time.monotonic_ns()
        try:
            response = await client.request("GET", url, headers=polled.headers)
        except HttpError as error:
            errors(hop.chain_index, hop.hop_index, error.reason)
            return
        finally:
            polled.in_flight.discard(url)
        if response.status != 200:
            errors(hop.chain_index, hop.hop_index, _status_reason(response.status))
            return
        body: Any = parse_json(response.body)
        try:
            trace_id = polled.trace_id.read(body, response.headers.items())
        except Unmatched as unmatched:
            errors(hop.chain_index, hop.hop_index, unmatched.reason)
            return
        shown = polled.last_shown
        if shown.get(url) == trace_id:
            return  # the same state again: not a new sighting, not a duplicate
        shown[url] = trace_id
        shown.move_to_end(url)
        if len(shown) > MAX_REMEMBERED_URLS:
            shown.popitem(last=False)
        # Waiting for a free connection slot is the prober's delay, not the platform's.
        seen_ns = response.received_ns - (response.sent_ns - asked_ns)
        self.context.tracker.observe(hop.chain_index, hop.hop_index, trace_id, seen_ns, body)


def _status_reason(status: int) -> str:
    if status == 404:
        return "not_found"
    if status == 503:
        return "unavailable"
    return f"http_{status // 100}xx"
