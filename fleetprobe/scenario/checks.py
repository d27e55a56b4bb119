"""Checks across parts of a scenario that one model's validation cannot see."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

from fleetprobe.scenario.models import Scenario
from transport.mqtt import make_tls_context

Finding = tuple[tuple[str | int, ...], str]


def cross_check(scenario: Scenario, base_dir: Path | None) -> Iterator[Finding]:
    """Yield ``(path, message)`` for every inconsistency between parts of ``scenario``."""
    signals = scenario.signals
    sent = {name for profile in scenario.fleet.profiles for name in profile.signals}
    yield from _unique(("fleet", "profiles"), [p.name for p in scenario.fleet.profiles])
    for i, profile in enumerate(scenario.fleet.profiles):
        for name in profile.signals:
            if name not in signals:
                yield (
                    ("fleet", "profiles", i, "signals", name),
                    f"unknown signal '{name}'; signals: {', '.join(signals)}",
                )

    yield from _unique(("chains",), [c.name for c in scenario.chains])
    for i, chain in enumerate(scenario.chains):
        if chain.signal not in signals:
            yield (
                ("chains", i, "signal"),
                f"unknown signal '{chain.signal}'; signals: {', '.join(signals)}",
            )
        elif chain.signal not in sent:
            yield ("chains", i, "signal"), f"no profile of the fleet sends '{chain.signal}'"
        yield from _unique(("chains", i, "hops"), [h.name for h in chain.hops])
        for j in range(1, len(chain.hops)):
            before, hop = chain.hops[j - 1], chain.hops[j]
            if hop.within < before.within:
                yield (
                    ("chains", i, "hops", j, "within"),
                    f"must be >= the previous hop's within ({before.name}: {before.within:g}s): "
                    "deadlines run from the send, so they cannot decrease along a chain",
                )

    chains = {c.name: c for c in scenario.chains}
    for i, objective in enumerate(scenario.slo):
        judged = chains.get(objective.chain)
        if judged is None:
            yield (
                ("slo", i, "chain"),
                f"unknown chain '{objective.chain}'; chains: {', '.join(chains) or 'none'}",
            )
        elif objective.hop is not None and objective.hop not in {h.name for h in judged.hops}:
            yield ("slo", i, "hop"), f"chain '{judged.name}' has no hop '{objective.hop}'"

    if scenario.target.mqtt.protocol == "3.1.1":
        for i, chain in enumerate(scenario.chains):
            for j, hop in enumerate(chain.hops):
                kind, config = hop.kind
                if kind == "mqtt" and config.property is not None:
                    yield (
                        ("chains", i, "hops", j, "mqtt", "property"),
                        "MQTT 3.1.1 has no user properties: use protocol 5 or trace_id: $.path",
                    )

    tls = scenario.target.mqtt.tls
    if tls is not None and base_dir is not None:
        missing = False
        for key in ("ca", "cert", "key"):
            name = getattr(tls, key)
            if name and not (base_dir / name).is_file():
                missing = True
                yield ("target", "mqtt", "tls", key), f"file not found: {base_dir / name}"
        if not missing:
            try:
                make_tls_context(
                    *(str(base_dir / n) if n else None for n in (tls.ca, tls.cert, tls.key))
                )
            except (ssl.SSLError, OSError, ValueError) as error:
                yield ("target", "mqtt", "tls"), f"unusable TLS files: {error}"


def _unique(where: tuple[str | int, ...], names: list[str]) -> Iterator[Finding]:
    """A finding for every repeat of a name among the items at ``where``."""
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            yield (*where, index, "name"), f"duplicate name '{name}' in {where[-1]}"
        seen.add(name)
