"""What a chain expects (specs) and what one followed signal got (results)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fleetprobe.probes.json_paths import JsonPath, compile_path
from fleetprobe.probes.trace_ids import MISSING, lookup
from fleetprobe.simulator.templates import TextTemplate


class HopResult(StrEnum):
    """How one hop went for one signal."""

    OK = "ok"
    TIMEOUT = "timeout"
    INVALID = "invalid"  # seen, but an expectation failed or the body was unreadable
    OUT_OF_ORDER = "out_of_order"  # seen before an earlier hop
    SUPERSEDED = "superseded"  # a later signal of the vehicle replaced it (latest-only state)


FAILURES = frozenset({HopResult.TIMEOUT, HopResult.INVALID, HopResult.OUT_OF_ORDER})
SKIPPED = "skipped"
"""The counted result of a failing hop downstream of the chain's first failure."""


class Verdict(StrEnum):
    """How the whole chain went for one signal."""

    OK = "ok"
    FAILED = "failed"
    ABORTED = "aborted"  # the run was interrupted before the chain could be judged


@dataclass(frozen=True)
class Expectation:
    """``path`` in the observed body must equal ``expected`` (a template is rendered with the
    signal's fields; any other value is compared as it is)."""

    path: str
    expected: TextTemplate | str | int | float | bool | None
    steps: JsonPath = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", compile_path(self.path))

    def mismatch(self, body: Any, fields: Mapping[str, Any]) -> str | None:
        """None when the body meets the expectation, else what differs."""
        want = (
            self.expected.render(fields)
            if isinstance(self.expected, TextTemplate)
            else self.expected
        )
        got = lookup(body, self.steps)
        if got is MISSING:
            return f"{self.path}: missing (expected {_short(want)})"
        if got != want or isinstance(got, bool) != isinstance(want, bool):
            return f"{self.path}: expected {_short(want)}, got {_short(got)}"
        return None


@dataclass(frozen=True)
class HopSpec:
    """One hop of a chain: its name, its deadline from the send, its expectations.

    ``latest``: the hop shows only a vehicle's latest signal (a state API), so seeing a
    signal supersedes the vehicle's older signals still pending there. ``uses_fields``:
    the hop's observer needs the signal's fields (a URL template).
    """

    name: str
    within_s: float
    expectations: tuple[Expectation, ...] = ()
    latest: bool = False
    uses_fields: bool = False


@dataclass(frozen=True)
class ChainSpec:
    """An ordered list of hops that every followed signal of ``signal`` must pass."""

    name: str
    signal: str
    hops: tuple[HopSpec, ...]
    sample: float = 1.0

    def follows(self, trace_id: str) -> bool:
        """Whether this chain follows the signal (a stable choice by trace id)."""
        if self.sample >= 1.0:
            return True
        digest = hashlib.blake2b(f"{self.name}/{trace_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") < self.sample * 2**64

    @property
    def needs_fields(self) -> bool:
        """Whether judging this chain needs the signal's field values."""
        return any(hop.expectations or hop.uses_fields for hop in self.hops)


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

    @property
    def intended_wall_ns(self) -> int:
        """When the fleet model scheduled the signal, on the wall clock."""
        return self.sent_wall_ns - (self.sent_ns - self.intended_ns)

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
        """Send to the last sighting, for a chain that ended ok."""
        if self.verdict is not Verdict.OK:
            return None
        last = max(self.seen_ns)
        return (last - self.sent_ns) / 1e9 if last else None

    def counted_result(self, hop: int) -> str:
        """The result counted in metrics and reports: a failure after the chain's first
        failure is counted as ``skipped``, so a chain breaks at one hop only."""
        result = self.results[hop]
        if result is None:
            return "pending"
        if result in FAILURES and self.failed_hop is not None and hop > self.failed_hop:
            return SKIPPED
        return result.value

    def add_detail(self, hop: int, text: str) -> None:
        """Keep why a hop was invalid (bounded, for the trace log)."""
        if self.details is None:
            self.details = {}
        self.details[hop] = text[:300]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
