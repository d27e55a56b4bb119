"""``fleetprobe demo``: a broker, the testbed and the demo scenario, nothing to install.

Mosquitto is used when it is installed; otherwise the embedded pure-Python broker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from contextlib import AsyncExitStack
from importlib import resources
from pathlib import Path

from testbed.gateway import Gateway, GatewayKnobs
from testbed.mosquitto import MosquittoProcess, mosquitto_path
from transport.mqtt import BrokerTarget

log = logging.getLogger("fleetprobe.demo")
GATEWAY_READY_TIMEOUT_S = 10.0


def demo_scenario_path() -> Path:
    """The shipped ``scenarios/demo.yaml``."""
    return Path(str(resources.files("scenarios").joinpath("demo.yaml")))


def run_demo(*, duration_s: float | None, metrics_listen: str, gateway_delay_s: float = 0.0) -> int:
    """Run the demo and return the run's exit code."""
    return asyncio.run(_demo(duration_s, metrics_listen, gateway_delay_s))


async def _demo(duration_s: float | None, metrics_listen: str, gateway_delay_s: float) -> int:
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
        url = f"mqtt://{host}:{port}"
        log.info("demo: %s on %s", kind, url)

        gateway = Gateway(BrokerTarget(host, port), GatewayKnobs(delay_s=gateway_delay_s))
        gateway_task = asyncio.create_task(gateway.run())
        stack.callback(gateway_task.cancel)
        async with asyncio.timeout(GATEWAY_READY_TIMEOUT_S):
            await gateway.wait_ready()

        environ = {
            **os.environ,
            "FLEETPROBE_MQTT_URL": url,
            "FLEETPROBE_METRICS_LISTEN": metrics_listen,
        }
        loaded = load_scenario(demo_scenario_path(), environ)
        result = await run_scenario(loaded, RunOptions(duration_s=duration_s, out=sys.stdout))
        return result.exit_code
    raise AssertionError("unreachable")
