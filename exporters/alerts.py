"""Send hop health changes as alerts: to Alertmanager's API, or to webhook receivers in
the format Alertmanager sends them.

A hop that goes down is a ``firing`` alert; the next change of the same hop (up) resolves
it, with the same ``startsAt`` and the same labels. A webhook receiver gets each change
once, as Alertmanager's webhook body (version 4), so one that understands Alertmanager
webhooks pairs them as it would pair Alertmanager's own. An Alertmanager gets the alert as
Prometheus sends it (``POST /api/v2/alerts``): while it fires it is sent again every
``resend_s`` with ``endsAt`` four resends ahead, so it resolves by itself if fleetprobe
goes away; resolved, it is sent with ``endsAt`` the time the hop came back.

:meth:`AlertSender.notify` never blocks the probe: it queues, and drops (and counts) when
the queue is full. :meth:`AlertSender.run` delivers in the background, retrying connection
errors and 5xx answers a few times with backoff before it counts a failure and moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter

from fleetprobe.core.events import HealthChange, RunEvents
from fleetprobe.core.queues import QueueState
from fleetprobe.core.times import iso_utc
from fleetprobe.transport.http import HttpClient, HttpError

log = logging.getLogger("fleetprobe.alerts")

ALERT_NAME = "FleetprobeHopDown"
RECEIVER = "fleetprobe"
WEBHOOK_VERSION = "4"
# Alertmanager's endsAt for an alert that has not ended (Go's zero time.Time).
NOT_ENDED = "0001-01-01T00:00:00Z"
# The labels that tell alerts apart; grouping by all of them makes each notification carry
# exactly one alert, so a receiver never reads one hop's "resolved" as another hop's.
GROUP_BY = ("alertname", "scenario", "chain", "hop")
RESULTS = ("ok", "failed", "dropped")

_FNV64_OFFSET = 0xCBF29CE484222325
_FNV64_PRIME = 0x100000001B3
_SEPARATOR = b"\xff"  # cannot occur in UTF-8, as in Prometheus' label signatures


RESEND_S = 60.0
"""How often a firing alert is sent to Alertmanager again (Prometheus' resend delay)."""
_RESENDS_AHEAD = 4  # a firing alert's endsAt, in resends: Prometheus' choice too


@dataclass(frozen=True, slots=True)
class AlertReceiver:
    """Where alerts go. ``webhook``: a receiver of Alertmanager's webhook format;
    ``alertmanager``: an Alertmanager, at its base URL (alerts go to /api/v2/alerts)."""

    url: str
    kind: Literal["webhook", "alertmanager"] = "webhook"

    @property
    def post_url(self) -> str:
        """Where the alerts are POSTed."""
        if self.kind == "alertmanager":
            return self.url.rstrip("/") + "/api/v2/alerts"
        return self.url


@dataclass(frozen=True, slots=True)
class _Notification:
    """One alert to deliver, with what the log needs to name it."""

    change: HealthChange
    status: str
    starts_at: str
    ends_at: str

    @property
    def chain(self) -> str:
        return self.change.chain

    @property
    def hop(self) -> str:
        return self.change.hop


class AlertSender(RunEvents):
    """Posts health changes to Alertmanagers and webhook receivers: a sink of the run's
    health changes.

    Args:
        receivers: every change goes to each of them (a plain URL is a webhook receiver).
        client: the shared HTTP client (it owns the connections).
        scenario: the scenario name, a label of every alert.
        queue_limit: changes waiting to be sent at most; more are dropped and counted.
        attempts: tries per receiver for connection errors and 5xx answers.
        backoff_s: the wait before the second try; it doubles for each further try.
        timeout_s: the time one request may take.
        registry: if given, ``fleetprobe_alerts_sent_total{scenario,result}`` lives there.
        resend_s: how often a firing alert goes to Alertmanagers again.
        generator_url: where an alert comes from (fleetprobe's /metrics), if served.

    Attributes:
        sent: deliveries a receiver accepted (one per change and URL, and one per resend
            of a firing alert to an Alertmanager).
        failed: deliveries given up (retries spent, a 4xx answer, or a crash).
        dropped: changes not queued because the queue was full.
    """

    def __init__(
        self,
        receivers: Sequence[AlertReceiver | str],
        client: HttpClient,
        *,
        scenario: str,
        queue_limit: int = 1000,
        attempts: int = 3,
        backoff_s: float = 0.5,
        timeout_s: float = 5.0,
        registry: CollectorRegistry | None = None,
        resend_s: float = RESEND_S,
        generator_url: str = "",
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.receivers = tuple(
            r if isinstance(r, AlertReceiver) else AlertReceiver(r) for r in receivers
        )
        self._resend_s = resend_s
        self._generator_url = generator_url
        self.scenario = scenario
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._client = client
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s
        self._queue: asyncio.Queue[_Notification] = asyncio.Queue(maxsize=queue_limit)
        # Each hop's firing alert, kept until it is resolved: bounded by the number of hops.
        # Kept at notify time, so a resolve still matches its firing alert (its startsAt)
        # when the firing one was dropped from a full queue; Alertmanagers get it again.
        self._firing: dict[tuple[str, str], _Notification] = {}
        # Held around each post to an Alertmanager, so that a resend can never reach it
        # after the resolve that followed it (the resend checks, inside, that it still fires).
        self._posting = asyncio.Lock()
        self._counters: dict[str, Counter] | None = None
        if registry is not None:
            counter = Counter(
                "fleetprobe_alerts_sent",
                "Alert notifications per receiver, by result (ok, failed, dropped).",
                ["scenario", "result"],
                registry=registry,
            )
            self._counters = {r: counter.labels(scenario, r) for r in RESULTS}

    @property
    def pending(self) -> int:
        """Notifications waiting in the queue."""
        return self._queue.qsize()

    @property
    def queue(self) -> QueueState:
        """The notification queue: waiting, its bound, changes dropped when it was full."""
        return QueueState(self._queue.qsize(), self._queue.maxsize, self.dropped)

    def health_changed(self, change: HealthChange) -> None:
        """Queue an alert for ``change``; never blocks. Over the queue limit: drop, count."""
        self._enqueue(self._notification(change))

    def _enqueue(self, notification: _Notification) -> None:
        try:
            self._queue.put_nowait(notification)
        except asyncio.QueueFull:
            self.dropped += 1
            self._count("dropped")
            if self.dropped == 1:  # once: a flood of drops must not flood the log too
                log.warning(
                    "alert queue full (%d): dropped the %s alert of hop %s > %s; "
                    "further drops are only counted",
                    self._queue.maxsize,
                    notification.status,
                    notification.chain,
                    notification.hop,
                )

    async def run(self) -> None:
        """Deliver queued alerts until cancelled, and send firing ones to Alertmanagers
        again every ``resend_s``; a failed delivery is counted, not raised."""
        resending = None
        if any(r.kind == "alertmanager" for r in self.receivers):
            resending = asyncio.create_task(self._resend_firing())
        try:
            await self._deliver_queued()
        finally:
            if resending is not None:
                resending.cancel()

    async def _resend_firing(self) -> None:
        """Every ``resend_s``, each alert still firing to each Alertmanager, one after the
        other and out of the change queue: resends never pile up behind a slow or absent
        Alertmanager, and a change waits at most for the one resend being posted."""
        managers = [(i, r) for i, r in enumerate(self.receivers) if r.kind == "alertmanager"]
        while True:
            await asyncio.sleep(self._resend_s)  # the resend period itself
            for key, firing in list(self._firing.items()):
                resend = _Notification(firing.change, "firing", firing.starts_at, NOT_ENDED)
                for index, receiver in managers:
                    async with self._posting:
                        if self._firing.get(key) is not firing:
                            break  # resolved (or fired anew) meanwhile
                        await self._deliver_safely(index, receiver, resend)

    async def _deliver_queued(self) -> None:
        while True:
            notification = await self._queue.get()
            try:
                for index, receiver in enumerate(self.receivers):
                    is_manager = receiver.kind == "alertmanager"
                    async with self._posting if is_manager else contextlib.nullcontext():
                        await self._deliver_safely(index, receiver, notification)
            finally:
                self._queue.task_done()

    async def _deliver_safely(
        self, index: int, receiver: AlertReceiver, notification: _Notification
    ) -> None:
        try:
            await self._deliver(index, receiver, notification)
        except Exception:
            # A bug here must cost one alert, not every later one: the loop goes on.
            # CancelledError is no Exception and still ends it.
            self.failed += 1
            self._count("failed")
            log.exception("alert receiver %d: delivery crashed", index + 1)

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued alert was handled (sent or failed), or ``timeout_s``.

        Returns:
            True when the queue was drained in time.
        """
        try:
            async with asyncio.timeout(timeout_s):
                await self._queue.join()
        except TimeoutError:
            return False
        return True

    async def _deliver(
        self, index: int, receiver: AlertReceiver, notification: _Notification
    ) -> None:
        where = f"alert receiver {index + 1} ({_redacted(receiver.url)})"
        problem = ""
        for attempt in range(self._attempts):
            if attempt:
                await asyncio.sleep(self._backoff_s * 2 ** (attempt - 1))
            try:
                response = await self._client.request(
                    "POST",
                    receiver.post_url,
                    headers={"Content-Type": "application/json"},
                    body=self._body(receiver, notification),
                    timeout_s=self._timeout_s,
                )
            except HttpError as error:
                # Logged by reason only: the message holds the URL, which may hold a token.
                problem = error.reason
                continue
            if 200 <= response.status < 300:
                self.sent += 1
                self._count("ok")
                return
            problem = f"HTTP {response.status}"
            if response.status < 500:
                break  # the receiver refused the alert; the same body would be refused again
        self.failed += 1
        self._count("failed")
        log.warning(
            "%s: could not deliver the %s alert of hop %s > %s (%s)",
            where,
            notification.status,
            notification.chain,
            notification.hop,
            problem,
        )

    def _notification(self, change: HealthChange) -> _Notification:
        key = (change.chain, change.hop)
        at = iso_utc(change.at_wall_ns)
        if change.up:
            firing = self._firing.pop(key, None)
            return _Notification(change, "resolved", firing.starts_at if firing else at, at)
        firing = self._firing.get(key)
        notification = _Notification(
            change, "firing", firing.starts_at if firing else at, NOT_ENDED
        )
        self._firing[key] = notification
        return notification

    def _body(self, receiver: AlertReceiver, notification: _Notification) -> bytes:
        change, status = notification.change, notification.status
        if receiver.kind == "webhook":
            payload: Any = webhook_payload(
                change,
                status=status,
                scenario=self.scenario,
                starts_at=notification.starts_at,
                ends_at=notification.ends_at,
            )
        else:
            ends_at = notification.ends_at
            if status == "firing":  # ends by itself unless sent again before then
                ahead_ns = int(_RESENDS_AHEAD * self._resend_s * 1e9)
                ends_at = iso_utc(time.time_ns() + ahead_ns)
            labels, annotations = alert_labels(change, self.scenario, status)
            payload = [
                {
                    "labels": labels,
                    "annotations": annotations,
                    "startsAt": notification.starts_at,
                    "endsAt": ends_at,
                    "generatorURL": self._generator_url,
                }
            ]
        return json.dumps(payload, separators=(",", ":")).encode()

    def _count(self, result: str) -> None:
        if self._counters is not None:
            self._counters[result].inc()


def webhook_payload(
    change: HealthChange, *, status: str, scenario: str, starts_at: str, ends_at: str
) -> dict[str, Any]:
    """The Alertmanager webhook body (version 4) with the one alert of ``change``.

    Args:
        change: the health change.
        status: ``firing`` or ``resolved``.
        scenario: the scenario name (a label).
        starts_at: when the alert began firing (ISO-8601).
        ends_at: when it was resolved, or :data:`NOT_ENDED`.
    """
    labels, annotations = alert_labels(change, scenario, status)
    group_labels = {name: labels[name] for name in GROUP_BY}
    return {
        "version": WEBHOOK_VERSION,
        "groupKey": f"{{}}:{_label_set(group_labels)}",
        "truncatedAlerts": 0,
        "status": status,
        "receiver": RECEIVER,
        "groupLabels": group_labels,
        "commonLabels": dict(labels),
        "commonAnnotations": dict(annotations),
        "externalURL": "",
        "alerts": [
            {
                "status": status,
                "labels": labels,
                "annotations": annotations,
                "startsAt": starts_at,
                "endsAt": ends_at,
                "generatorURL": "",
                "fingerprint": fingerprint(labels),
            }
        ],
    }


def alert_labels(
    change: HealthChange, scenario: str, status: str
) -> tuple[dict[str, str], dict[str, str]]:
    """The labels and annotations of the alert of ``change`` (``status``: firing or
    resolved), the same in both formats."""
    labels = {
        "alertname": ALERT_NAME,
        "severity": "critical",
        "scenario": scenario,
        "chain": change.chain,
        "hop": change.hop,
    }
    state = "down" if status == "firing" else "up again"
    annotations = {
        "summary": f"fleetprobe: hop {change.chain} > {change.hop} is {state}",
        "description": (
            f"{change.success_ratio:.1%} of {change.samples} signals ok at hop {change.hop} "
            f"of chain {change.chain} over the last {change.window_s:g}s "
            f"(objective {change.objective:.1%}); "
            f"first failing hop: {change.first_failing_hop or 'none'}"
        ),
    }
    return labels, annotations


def fingerprint(labels: Mapping[str, str]) -> str:
    """The alert's fingerprint as Alertmanager computes it: FNV-1a 64 over the sorted labels
    (name, 0xff, value, 0xff each), as 16 hex digits. Stable across runs and processes."""
    digest = _FNV64_OFFSET
    for name in sorted(labels):
        for chunk in (name.encode(), _SEPARATOR, labels[name].encode(), _SEPARATOR):
            for byte in chunk:
                digest = ((digest ^ byte) * _FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{digest:016x}"


def _label_set(labels: Mapping[str, str]) -> str:
    """``{a="1", b="2"}``, sorted, values quoted: how Alertmanager writes a group key."""
    pairs = ", ".join(
        f"{name}={json.dumps(labels[name], ensure_ascii=False)}" for name in sorted(labels)
    )
    return f"{{{pairs}}}"


def _redacted(url: str) -> str:
    """The scheme and host of ``url``: webhook paths and queries often carry secrets."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2] or "?"  # never the user:password part
    return f"{parts.scheme}://{host}/..."
