"""What a chain expects: its hops, their deadlines and expectations (the results of a
followed signal are in :mod:`fleetprobe.core.results`)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fleetprobe.probes.json_paths import JsonPath, compile_path
from fleetprobe.probes.trace_ids import MISSING, lookup
from fleetprobe.simulator.templates import TextTemplate


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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
