"""Security by default: every server fleetprobe opens listens on loopback unless told."""

from __future__ import annotations

import argparse

from conftest import scenario_dict
from fleetprobe.app.cli import _parser
from fleetprobe.app.scenario.faults import ProxyConfig
from fleetprobe.app.scenario.models import Scenario
from fleetprobe.testbed import cli as testbed_cli


def subcommand(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = commands.choices[name]
    return parser


def test_every_listening_address_defaults_to_loopback() -> None:
    exporters = Scenario.model_validate(
        {**scenario_dict("mqtt://127.0.0.1:1", "p"), "exporters": {"prometheus": {}}}
    ).exporters
    assert exporters.prometheus is not None
    listens = {
        "/metrics": exporters.prometheus.listen,
        "webhook receiver": exporters.webhook_receiver.listen,
        "fault proxy": ProxyConfig(name="p", upstream="127.0.0.1:1883").listen,
        "fault proxy API": subcommand("proxy").parse_args([]).api,
        "demo /metrics": subcommand("demo").parse_args([]).metrics_listen,
        "testbed": testbed_cli.DEFAULT_HTTP,
    }
    assert {name: a.rpartition(":")[0] for name, a in listens.items()} == dict.fromkeys(
        listens, "127.0.0.1"
    )
