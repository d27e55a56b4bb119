"""The shape of the testbed's events: the gateway's envelope and the processor's additions.

An event is the vehicle's JSON payload with a ``meta`` object: ``trace_id``,
``received_at`` and ``source_topic`` from the gateway; ``processed_at`` and ``signal``
(the last level of the source topic) from the processor.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def utc_now_iso() -> str:
    """The wall-clock time now, like ``2026-11-22T10:00:00.123456Z``."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def envelope(payload: dict[str, Any], source_topic: str) -> dict[str, Any]:
    """The gateway's event: ``payload`` plus ``meta`` (trace id, receive time, topic)."""
    return {
        **payload,
        "meta": {
            "trace_id": payload.get("trace_id"),
            "received_at": utc_now_iso(),
            "source_topic": source_topic,
        },
    }


def enrich(event: dict[str, Any]) -> dict[str, Any]:
    """The processor's event: ``meta.processed_at`` and ``meta.signal`` added.

    An event that skipped the gateway (no ``meta``) keeps its top-level ``trace_id``.
    """
    meta = event.get("meta")
    meta = dict(meta) if isinstance(meta, dict) else {"trace_id": event.get("trace_id")}
    source = meta.get("source_topic")
    meta["signal"] = source.rsplit("/", 1)[-1] if isinstance(source, str) and source else None
    meta["processed_at"] = utc_now_iso()
    return {**event, "meta": meta}


def trace_id_of(event: dict[str, Any]) -> str | None:
    """The event's ``meta.trace_id`` (None when absent or not a string)."""
    meta = event.get("meta")
    value = meta.get("trace_id") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def signal_of(event: dict[str, Any]) -> str | None:
    """The event's ``meta.signal`` (None when absent or not a string)."""
    meta = event.get("meta")
    value = meta.get("signal") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def sent_at_of(event: dict[str, Any]) -> float | None:
    """The event's ``sent_at`` as POSIX seconds: ISO 8601 text or a number; else None."""
    value = event.get("sent_at")
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value)
        except ValueError:
            return None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return stamp.timestamp()
    return None
