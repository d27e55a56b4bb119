"""Checks across parts of a scenario that one model's validation cannot see."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from fleetprobe.app.scenario.faults import target_of
from fleetprobe.app.scenario.models import Scenario
from fleetprobe.transport.mqtt import make_tls_context

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

    yield from _check_faults(scenario)

    for i, chain in enumerate(scenario.chains):
        for j, hop in enumerate(chain.hops):
            kind, config = hop.kind
            for below, message in config.problems(scenario.target.mqtt.protocol, base_dir):
                yield ("chains", i, "hops", j, kind, *below), message

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


def _check_faults(scenario: Scenario) -> Iterator[Finding]:
    """Fault targets, the fleet's proxy and the expected outcomes name what exists."""
    faults = scenario.faults
    proxies = {p.name for p in faults.proxies}
    yield from _unique(("faults", "proxies"), [p.name for p in faults.proxies])
    via = scenario.target.mqtt.via
    if via is not None and via not in proxies:
        yield (
            ("target", "mqtt", "via"),
            f"unknown proxy '{via}'; faults.proxies: {', '.join(sorted(proxies)) or 'none'}",
        )
    if faults.backend == "toxiproxy":
        parts = urlsplit(faults.toxiproxy)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            yield (
                ("faults", "toxiproxy"),
                "must be the Toxiproxy API's URL, like http://127.0.0.1:8474",
            )
    labels = [f.label for f in faults.timeline]
    seen: set[str] = set()
    for i, (fault, label) in enumerate(zip(faults.timeline, labels, strict=True)):
        where: tuple[str | int, ...] = ("faults", "timeline", i)
        if label in seen:
            yield (*where, "name"), f"two faults are called '{label}': give each a name"
        seen.add(label)
        kind = target_of(fault.kind)
        if kind == "proxy" and fault.target not in proxies:
            yield (
                (*where, "target"),
                f"unknown proxy '{fault.target}' (a {fault.kind} fault acts on a proxy); "
                "faults.proxies: "
                f"{', '.join(sorted(proxies)) or 'none'}",
            )
        elif kind == "fleet" and fault.target != "fleet":
            yield (*where, "target"), f"a {fault.kind} fault acts on the fleet: target: fleet"
        if fault.end > scenario.duration:
            yield (
                (*where, "for" if fault.for_ else "at"),
                f"the fault ends at {fault.end:g}s, after the run's duration "
                f"({scenario.duration:g}s)",
            )

    chains = {c.name: c for c in scenario.chains}
    for i, expected in enumerate(scenario.expect):
        where = ("expect", i)
        if expected.fault not in seen:
            yield (
                (*where, "fault"),
                f"unknown fault '{expected.fault}'; faults: {', '.join(labels) or 'none'}",
            )
        chain = chains.get(expected.chain)
        if chain is None:
            yield (
                (*where, "chain"),
                f"unknown chain '{expected.chain}'; chains: {', '.join(chains) or 'none'}",
            )
            continue
        hops = [h.name for h in chain.hops]
        for key in ("hop", "fails_at"):
            hop = getattr(expected, key)
            if hop is not None and hop not in hops:
                yield (
                    (*where, key),
                    f"chain '{chain.name}' has no hop '{hop}'; hops: {', '.join(hops)}",
                )


def _unique(where: tuple[str | int, ...], names: list[str]) -> Iterator[Finding]:
    """A finding for every repeat of a name among the items at ``where``."""
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            yield (*where, index, "name"), f"duplicate name '{name}' in {where[-1]}"
        seen.add(name)
