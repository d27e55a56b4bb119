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

from testbed.knobs import StageKnobs
from testbed.mosquitto import MosquittoProcess, free_port, mosquitto_path
from testbed.platform import Testbed
from testbed.topics import TestbedTopics
from testbed.webhooks import WebhookTarget
from transport.mqtt import BrokerTarget

log = logging.getLogger("fleetprobe.demo")


def demo_scenario_path() -> Path:
    """The shipped ``scenarios/demo.yaml``."""
    return Path(str(resources.files("scenarios").joinpath("demo.yaml")))


async def run_demo(
    *, duration_s: float | None, metrics_listen: str, knobs: Mapping[str, StageKnobs]
) -> int:
    """Run the demo with the testbed's stages set by ``knobs``; return the run's exit code."""
    from fleetprobe.run import RunOptions, run_scenario
    from fleetprobe.scenario import load_scenario

    async with AsyncExitStack() as stack:
        if mosquitto_path():
            broker = stack.enter_context(MosquittoProcess())
            host, port, kind = broker.host, broker.port, "mosquitto"
        else:
            from testbed.broker import EmbeddedBroker

            embedded = await stack.enter_async_context(EmbeddedBroker(host="127.0.0.1", port=0))
            host, port, kind = "127.0.0.1", embedded.port, "embedded broker"
        log.info("demo: %s on mqtt://%s:%d", kind, host, port)

        webhook_listen = f"127.0.0.1:{free_port()}"
        webhook_secret = secrets.token_hex(16)
        testbed = await stack.enter_async_context(
            Testbed(
                BrokerTarget(host, port),
                # Telemetry only: a door event stored as a vehicle's latest state would
                # hide its telemetry from the state API.
                topics=TestbedTopics(vehicles="vehicles/+/telemetry"),
                webhooks=[
                    WebhookTarget(
                        f"http://{webhook_listen}/hooks/telemetry",
                        signals=("telemetry",),
                        secret=webhook_secret,
                    )
                ],
                knobs=knobs,
            )
        )
        log.info(
            "demo: testbed at %s (break a stage: curl -d '{\"drop\": 0.2}' %s/control/processor)",
            testbed.url,
            testbed.url,
        )
        environ = {
            **os.environ,
            "FLEETPROBE_MQTT_URL": f"mqtt://{host}:{port}",
            "FLEETPROBE_METRICS_LISTEN": metrics_listen,
            "FLEETPROBE_TESTBED_URL": testbed.url,
            "FLEETPROBE_WEBHOOK_LISTEN": webhook_listen,
            "FLEETPROBE_WEBHOOK_SECRET": webhook_secret,
        }
        loaded = load_scenario(demo_scenario_path(), environ)
        result = await run_scenario(loaded, RunOptions(duration_s=duration_s, out=sys.stdout))
        return result.exit_code
    raise AssertionError("unreachable")
