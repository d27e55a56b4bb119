"""``fleetprobe demo``: a broker, the full testbed and the demo scenario, nothing to install.

Mosquitto is used when it is installed; otherwise the embedded pure-Python broker. The
testbed's state API and fleetprobe's webhook receiver take free loopback ports, and the
testbed signs its webhook calls with a secret made for this demo.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from collections.abc import Mapping
from contextlib import AsyncExitStack
from importlib import resources
from pathlib import Path

from fleetprobe.testbed.knobs import StageKnobs
from fleetprobe.testbed.mosquitto import MosquittoProcess, free_ports, mosquitto_path
from fleetprobe.testbed.platform import Testbed
from fleetprobe.testbed.topics import TestbedTopics
from fleetprobe.testbed.webhooks import WebhookTarget
from fleetprobe.transport.mqtt import BrokerTarget

log = logging.getLogger("fleetprobe.demo")


def demo_scenario_path() -> Path:
    """The shipped ``scenarios/demo.yaml``."""
    return shipped_scenario("demo.yaml")


def shipped_scenario(name: str) -> Path:
    """A scenario shipped with fleetprobe, like ``drills/broker-latency.yaml``."""
    return Path(str(resources.files("fleetprobe.scenarios").joinpath(name)))


def find_scenario(path: Path) -> Path:
    """``path`` if it exists, else the shipped scenario of that name (so an installed
    fleetprobe runs ``--scenario drills/broker-latency.yaml`` from anywhere)."""
    if path.exists() or path.is_absolute():
        return path
    shipped = shipped_scenario(str(path).removeprefix("scenarios/"))
    return shipped if shipped.exists() else path


async def run_demo(
    *,
    duration_s: float | None,
    metrics_listen: str,
    knobs: Mapping[str, StageKnobs],
    scenario: Path | None = None,
) -> int:
    """Run the demo (or ``scenario``) against the testbed with its stages set by ``knobs``;
    return the run's exit code."""
    from fleetprobe.app.run import RunOptions, run_scenario
    from fleetprobe.app.scenario import load_scenario

    async with AsyncExitStack() as stack:
        if mosquitto_path():
            broker = stack.enter_context(MosquittoProcess())
            host, port, kind = broker.host, broker.port, "mosquitto"
        else:
            from fleetprobe.testbed.broker import EmbeddedBroker

            embedded = await stack.enter_async_context(EmbeddedBroker(host="127.0.0.1", port=0))
            host, port, kind = "127.0.0.1", embedded.port, "embedded broker"
        log.info("demo: %s on mqtt://%s:%d", kind, host, port)

        webhook_port, testbed_port = free_ports(2)
        webhook_listen = f"127.0.0.1:{webhook_port}"
        webhook_secret = secrets.token_hex(16)
        environ = {
            **os.environ,
            "FLEETPROBE_MQTT_URL": f"mqtt://{host}:{port}",
            "FLEETPROBE_MQTT_ADDRESS": f"{host}:{port}",
            "FLEETPROBE_METRICS_LISTEN": metrics_listen,
            "FLEETPROBE_TESTBED_URL": f"http://127.0.0.1:{testbed_port}",
            "FLEETPROBE_WEBHOOK_LISTEN": webhook_listen,
            "FLEETPROBE_WEBHOOK_SECRET": webhook_secret,
        }
        loaded = load_scenario(
            find_scenario(scenario) if scenario else demo_scenario_path(), environ
        )
        # The testbed calls the webhook only when the scenario has a hop that receives it.
        receives_webhooks = any(
            hop.kind[1].receives_webhooks for chain in loaded.scenario.chains for hop in chain.hops
        )
        hook_url = f"http://{webhook_listen}/hooks/telemetry"
        webhook = WebhookTarget(hook_url, signals=("telemetry",), secret=webhook_secret)
        testbed = await stack.enter_async_context(
            Testbed(
                BrokerTarget(host, port),
                # Telemetry only: a door event stored as a vehicle's latest state would
                # hide its telemetry from the state API.
                topics=TestbedTopics(vehicles="vehicles/+/telemetry"),
                http_port=testbed_port,
                webhooks=[webhook] if receives_webhooks else [],
                knobs=knobs,
            )
        )
        log.info(
            "demo: testbed at %s (break a stage: curl -d '{\"drop\": 0.2}' %s/control/processor)",
            testbed.url,
            testbed.url,
        )
        result = await run_scenario(loaded, RunOptions(duration_s=duration_s, out=sys.stdout))
        return result.exit_code
    raise AssertionError("unreachable")
