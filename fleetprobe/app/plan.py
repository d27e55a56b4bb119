"""Turn a validated scenario into the inputs of the simulator, the probes and the transport."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fleetprobe.app.scenario.models import AlertDestination, HopBase, Scenario
from fleetprobe.exporters.alerts import AlertReceiver
from fleetprobe.probes.chains import ChainSpec, Expectation, HopSpec
from fleetprobe.probes.observers import WatchedHop
from fleetprobe.simulator.fleet import (
    SIGNAL_FIELDS,
    TOPIC_FIELDS,
    Area,
    Cadence,
    FleetSpec,
    Profile,
)
from fleetprobe.simulator.publisher import SignalSpec
from fleetprobe.simulator.templates import PayloadTemplate, TextTemplate
from fleetprobe.transport.mqtt import BrokerTarget, make_tls_context, parse_broker_url


@dataclass(frozen=True)
class RunPlan:
    """Everything a run needs, derived once from the scenario."""

    fleet: FleetSpec
    signals: dict[str, SignalSpec]
    chains: tuple[ChainSpec, ...]
    hops_by_kind: dict[str, list[WatchedHop]]
    broker: BrokerTarget

    @property
    def drain_s(self) -> float:
        """How long a run waits after emission for its last signals: the longest hop
        deadline, and a second for the sweep."""
        return max((h.within_s for c in self.chains for h in c.hops), default=0.0) + 1.0


def make_plan(scenario: Scenario, base_dir: Path, run_id: str = "") -> RunPlan:
    """Build the run's plan; TLS files are read relative to ``base_dir``; trace ids derive
    from the scenario's seed and ``run_id``."""
    return RunPlan(
        fleet=_fleet(scenario, run_id),
        signals={
            name: SignalSpec(
                name,
                TextTemplate(s.topic, TOPIC_FIELDS),
                s.qos,
                PayloadTemplate(s.payload, SIGNAL_FIELDS),
            )
            for name, s in scenario.signals.items()
        },
        chains=tuple(
            ChainSpec(
                name=chain.name,
                signal=chain.signal,
                sample=chain.sample,
                hops=tuple(_hop_spec(hop) for hop in chain.hops),
            )
            for chain in scenario.chains
        ),
        hops_by_kind=_hops_by_kind(scenario, base_dir),
        broker=make_broker_target(scenario, base_dir),
    )


def make_broker_target(scenario: Scenario, base_dir: Path) -> BrokerTarget:
    """The broker of ``scenario.target.mqtt``, with a TLS context for ``mqtts://``."""
    mqtt = scenario.target.mqtt
    host, port, use_tls = parse_broker_url(mqtt.url)
    tls = None
    if use_tls or mqtt.tls is not None:
        files = mqtt.tls
        tls = make_tls_context(
            str(base_dir / files.ca) if files and files.ca else None,
            str(base_dir / files.cert) if files and files.cert else None,
            str(base_dir / files.key) if files and files.key else None,
        )
    return BrokerTarget(
        host=host,
        port=port,
        protocol=mqtt.protocol,
        username=mqtt.username,
        password=mqtt.password.get_secret_value() if mqtt.password else None,
        tls=tls,
        keepalive_s=max(1, round(mqtt.keepalive)),
        ack_timeout_s=mqtt.ack_timeout,
        session_expiry_s=round(mqtt.session.expiry) if mqtt.session else None,
        inflight=mqtt.inflight,
        downgrade_qos=mqtt.downgrade_qos,
    )


def _fleet(scenario: Scenario, run_id: str) -> FleetSpec:
    fleet = scenario.fleet
    return FleetSpec(
        seed=scenario.seed,
        run_id=run_id,
        vehicles=fleet.vehicles,
        area=Area(fleet.area.lat, fleet.area.lon, fleet.area.radius_km),
        profiles=tuple(
            Profile(
                name=p.name,
                weight=p.weight,
                speed_kmh=p.speed_kmh,
                powertrain=p.powertrain,
                signals={n: Cadence(c.every, c.jitter_s) for n, c in p.signals.items()},
            )
            for p in fleet.profiles
        ),
    )


def _hop_spec(hop: HopBase) -> HopSpec:
    _, config = hop.kind
    return HopSpec(
        name=hop.name,
        within_s=hop.within,
        expectations=tuple(
            Expectation(
                path, TextTemplate(value, SIGNAL_FIELDS) if isinstance(value, str) else value
            )
            for path, value in hop.expect.items()
        ),
        latest=config.latest_only,
        uses_fields=bool(config.template_fields()),
    )


def _hops_by_kind(scenario: Scenario, base_dir: Path) -> dict[str, list[WatchedHop]]:
    grouped: dict[str, list[WatchedHop]] = defaultdict(list)
    for c, chain in enumerate(scenario.chains):
        for h, hop in enumerate(chain.hops):
            kind, config = hop.kind
            located = config.located(base_dir)
            grouped[kind].append(WatchedHop(c, h, chain.name, hop.name, located))
    return dict(grouped)


def alert_receivers(alerts: Sequence[str | AlertDestination]) -> list[AlertReceiver]:
    """The scenario's ``alerts`` as receivers: a plain URL is a webhook receiver."""
    receivers = []
    for alert in alerts:
        if isinstance(alert, str):
            receivers.append(AlertReceiver(alert))
        elif alert.alertmanager is not None:
            receivers.append(AlertReceiver(alert.alertmanager, "alertmanager"))
        else:
            assert alert.webhook is not None
            receivers.append(AlertReceiver(alert.webhook))
    return receivers
