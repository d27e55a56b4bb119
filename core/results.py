"""What happened to a followed signal, and the measures every output reads from it.

Each measure is defined here once, as data; metrics, report.json, traces.jsonl, the
summary, health, objectives and the Prometheus rules in deploy/ use these definitions:

- A hop's **counted result** is its own result, except that a failure *after* the chain's
  first failing hop is counted as ``skipped``: a chain breaks at one hop only.
- At a hop, **ok** is ``ok`` or ``superseded``; **failed** is ``timeout``, ``invalid`` or
  ``out_of_order``; ``skipped`` (and ``pending``, an interrupted run's unjudged hop) is no
  sample of the hop at all. A hop's **success ratio** is ok / (ok + failed).
- A chain's verdict is ``ok`` when every hop is ok, else ``failed`` at its first failing
  hop; ``aborted`` (the run was interrupted first) says nothing of the platform. A signal the
  chain would have followed but that could not be sent is **unsent**: the platform did not
  take it. A chain's **success ratio** is ok / (ok + failed + unsent).
- What the prober's own limits hid is never the platform's: a hop the prober could not
  judge (it was blind when the deadline passed, see :mod:`fleetprobe.core.blind_spans`) is
  ``inconclusive``, and so is a chain with no failure but such a hop; a signal sent while
  the prober could not keep up is **not followed** (reason ``saturated``). Neither counts
  in a success ratio: objectives take them as unknowns, and a run whose objectives they
  could decide is itself inconclusive.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class HopResult(StrEnum):
    """How one hop went for one signal."""

    OK = "ok"
    TIMEOUT = "timeout"
    INVALID = "invalid"  # seen, but an expectation failed or the body was unreadable
    OUT_OF_ORDER = "out_of_order"  # seen before an earlier hop
    SUPERSEDED = "superseded"  # a later signal of the vehicle replaced it (latest-only state)
    INCONCLUSIVE = "inconclusive"  # the prober was blind when it would have been judged


class Verdict(StrEnum):
    """How the whole chain went for one signal."""

    OK = "ok"
    FAILED = "failed"
    ABORTED = "aborted"  # the run was interrupted before the chain could be judged
    INCONCLUSIVE = "inconclusive"  # no hop failed, but the prober could not judge one


SKIPPED = "skipped"
"""The counted result of a failing hop downstream of the chain's first failure."""
PENDING = "pending"
"""The counted result of a hop an interrupted run could not judge."""
UNSENT = "unsent"
"""A chain's count of the signals it would have followed whose send failed."""
SATURATED = "saturated"
"""Why a signal was sent but not followed: the prober could not keep up (it follows
again once it does)."""

FAILURES = frozenset({HopResult.TIMEOUT, HopResult.INVALID, HopResult.OUT_OF_ORDER})
"""A hop's own failures: the first of them in a chain is where the chain broke."""
HOP_OK = frozenset({HopResult.OK.value, HopResult.SUPERSEDED.value})
"""Counted results that count as ok at a hop."""
HOP_FAILED = frozenset(result.value for result in FAILURES)
"""Counted results that count as failed at a hop."""
COUNTED_RESULTS = (*(result.value for result in HopResult), SKIPPED)
"""Every counted result of a judged hop, in the order outputs list them."""
CHAIN_RESULTS = (*(verdict.value for verdict in Verdict), UNSENT)
"""Every chain result that is counted, in the order outputs list them."""


def hop_success_ratio(results: Mapping[str, int]) -> float | None:
    """ok / (ok + failed) over a hop's counted results; None when nothing was judged."""
    ok = sum(results.get(r, 0) for r in HOP_OK)
    judged = ok + sum(results.get(r, 0) for r in HOP_FAILED)
    return ok / judged if judged else None


def chain_success_ratio(ok: int, failed: int, unsent: int) -> float | None:
    """ok / (ok + failed + unsent) of a chain; None when nothing was judged or unsent.

    The same formula as the recording rule
    ``scenario_chain:fleetprobe_chain_success:ratio_rate5m`` in deploy/prometheus.
    """
    judged = ok + failed + unsent
    return ok / judged if judged else None


class FollowedSignal:
    """One signal followed by one chain: what each hop saw, and the verdict."""

    __slots__ = (
        "chain_index",
        "details",
        "duplicates",
        "failed_hop",
        "fields",
        "held",
        "intended_ns",
        "results",
        "seen_ns",
        "sent_ns",
        "sent_wall_ns",
        "signal",
        "trace_id",
        "uncertain",
        "verdict",
        "vin",
    )

    def __init__(
        self,
        chain_index: int,
        hops: int,
        trace_id: str,
        signal: str,
        vin: str,
        intended_ns: int,
        sent_ns: int,
        sent_wall_ns: int,
        fields: Mapping[str, Any] | None,
    ) -> None:
        self.chain_index = chain_index
        self.trace_id = trace_id
        self.signal = signal
        self.vin = vin
        self.intended_ns = intended_ns
        self.sent_ns = sent_ns
        self.sent_wall_ns = sent_wall_ns
        self.fields = fields
        self.seen_ns: list[int] = [0] * hops  # 0: not seen
        self.results: list[HopResult | None] = [None] * hops
        self.details: dict[int, str] | None = None
        # Hops seen before an earlier hop was judged: their result waits for the order check.
        self.held: dict[int, HopResult] | None = None
        self.duplicates: dict[int, int] | None = None
        self.verdict: Verdict | None = None
        self.failed_hop: int | None = None
        self.uncertain = 0  # bit h: hop h was read while the prober was blind

    @property
    def intended_wall_ns(self) -> int:
        """When the fleet model scheduled the signal, on the wall clock."""
        return self.sent_wall_ns - (self.sent_ns - self.intended_ns)

    def latency_known(self, hop: int) -> bool:
        """Whether a seen hop's stamp is exact (it was not read while the prober was blind:
        then the latency is at most what it shows)."""
        return not self.uncertain >> hop & 1

    def latency_s(self, hop: int) -> float | None:
        """Seen minus sent, for a seen hop."""
        seen = self.seen_ns[hop]
        return (seen - self.sent_ns) / 1e9 if seen else None

    def step_s(self, hop: int) -> float | None:
        """Seen minus the previous hop's seen (the first hop: its latency)."""
        seen = self.seen_ns[hop]
        if not seen:
            return None
        before = self.sent_ns if hop == 0 else self.seen_ns[hop - 1]
        return (seen - before) / 1e9 if before else None

    def chain_latency_s(self) -> float | None:
        """Send to the last sighting, for a chain that ended ok (at most that, when a hop
        was read while the prober was blind: see :attr:`uncertain`)."""
        if self.verdict is not Verdict.OK:
            return None
        last = max(self.seen_ns)
        return (last - self.sent_ns) / 1e9 if last else None

    def counted_result(self, hop: int) -> str:
        """The result every output counts (see the module's docstring): ``pending`` for
        an unjudged hop, ``skipped`` for a failure after the chain's first failure."""
        result = self.results[hop]
        if result is None:
            return PENDING
        if result in FAILURES and self.failed_hop is not None and hop > self.failed_hop:
            return SKIPPED
        return result.value

    def add_detail(self, hop: int, text: str) -> None:
        """Keep why a hop was invalid (bounded, for the trace log)."""
        if self.details is None:
            self.details = {}
        self.details[hop] = text[:300]
