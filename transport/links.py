"""The health of a group of MQTT sessions (the fleet's, the observers'): how many are up,
how often they came back, and each outage from the first session lost to the last back.

Publishers and observers update a :class:`LinkStats`; the run exports it and the report
names each outage, so a broker restart shows as what it was rather than as lost signals.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any


class Backoff:
    """Waits between reconnection attempts: exponential with full jitter.

    The n-th wait is uniform in ``[0, min(cap_s, first_s * 2**n)]``, so sessions that lost
    the broker together do not come back together (no thundering herd on its restart).
    """

    def __init__(self, first_s: float = 0.1, cap_s: float = 5.0, rng: random.Random | None = None):
        self.first_s, self.cap_s = first_s, cap_s
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_s(self) -> float:
        """The wait before the next attempt."""
        ceiling = min(self.cap_s, self.first_s * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        return self._rng.uniform(0.0, ceiling)


@dataclass
class Outage:
    """From the first session of a group lost to the last one back (``ended`` None: still
    out when the run ended)."""

    started_wall_ns: int
    ended_wall_ns: int | None = None
    sessions_lost: int = 0

    def as_dict(self, iso: Any) -> dict[str, Any]:
        """JSON-ready, times formatted by ``iso``."""
        ended = self.ended_wall_ns
        return {
            "from": iso(self.started_wall_ns),
            "to": None if ended is None else iso(ended),
            "duration_s": None if ended is None else round((ended - self.started_wall_ns) / 1e9, 3),
            "sessions_lost": self.sessions_lost,
        }


@dataclass
class LinkStats:
    """The sessions of one role."""

    role: str
    expected: int = 0  # sessions that should be up
    connected: int = 0
    reconnects: int = 0
    gave_up: int = 0  # sessions not reconnected (duplicate client id, refused credentials)
    unacknowledged: int = 0  # QoS 1/2 publishes the broker did not acknowledge in time
    protocol_errors: int = 0  # publishes the broker answered out of protocol
    resumed: int = 0  # reconnects that found their persistent session kept by the broker
    resent: int = 0  # unfinished publishes sent again on resuming (DUP) or PUBRELs again
    broker: dict[str, object] | None = None  # what the broker announced (its CONNACK)
    outages: list[Outage] = field(default_factory=list)

    def up(self) -> None:
        """A session connected (at the start, or again after a loss)."""
        self.connected += 1
        self._end_outage_when_whole()

    def reconnected(self, *, resumed: bool = False, resent: int = 0) -> None:
        """A lost session connected again (``resumed``: the broker had kept its session,
        and ``resent`` unfinished flows went out again)."""
        self.reconnects += 1
        self.resumed += resumed
        self.resent += resent
        self.up()

    def lost(self) -> None:
        """A session lost its connection."""
        self.connected -= 1
        if not self.outages or self.outages[-1].ended_wall_ns is not None:
            self.outages.append(Outage(time.time_ns()))
        self.outages[-1].sessions_lost += 1

    def given_up(self) -> None:
        """A lost session will not be reconnected: it is no longer expected to be up, so
        the outage it was part of can end and later ones are told apart."""
        self.expected -= 1
        self.gave_up += 1
        self._end_outage_when_whole()

    def _end_outage_when_whole(self) -> None:
        outages = self.outages
        if self.connected >= self.expected and outages and outages[-1].ended_wall_ns is None:
            outages[-1].ended_wall_ns = time.time_ns()

    def as_report(self, iso: Any) -> dict[str, Any]:
        """What report.json keeps of this role."""
        return {
            "sessions": self.expected + self.gave_up,
            "reconnects": self.reconnects,
            "given_up": self.gave_up,
            "unacknowledged": self.unacknowledged,
            "protocol_errors": self.protocol_errors,
            "resumed": self.resumed,
            "resent": self.resent,
            "broker": self.broker,
            "outages": [o.as_dict(iso) for o in self.outages],
        }


def merge_link_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``mqtt`` report of several shard processes: per role, sessions and reconnects
    added up, outages side by side in time order."""
    merged: dict[str, Any] = {}
    for report in reports:
        for role, part in report.items():
            counts = (
                "sessions",
                "reconnects",
                "given_up",
                "unacknowledged",
                "protocol_errors",
                "resumed",
                "resent",
            )
            mine = merged.setdefault(
                role, {**dict.fromkeys(counts, 0), "broker": part["broker"], "outages": []}
            )
            for count in counts:
                mine[count] += part[count]
            mine["outages"].extend(part["outages"])
    for part in merged.values():
        part["outages"].sort(key=lambda outage: outage["from"])
    return merged
