"""``fleetprobe testbed``: run the reference platform until interrupted."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from testbed.gateway import Gateway, GatewayKnobs
from transport.errors import ConnectError
from transport.mqtt import BrokerTarget, parse_broker_url

log = logging.getLogger("fleetprobe.testbed")


def run_testbed(
    url: str, *, delay_s: float = 0.0, jitter_s: float = 0.0, drop_ratio: float = 0.0
) -> int:
    """Serve the testbed against the broker at ``url``; returns an exit code."""
    host, port, tls = parse_broker_url(url)
    if tls:
        raise ValueError("the testbed connects to plain mqtt:// brokers only")
    gateway = Gateway(BrokerTarget(host, port), GatewayKnobs(delay_s, jitter_s, drop_ratio))

    async def serve() -> None:
        task = asyncio.create_task(gateway.run())
        await gateway.wait_ready()
        log.info(
            "testbed gateway: vehicles/+/telemetry -> platform/events/{vin} on %s "
            "(delay %gs ± %gs, drop %g)",
            url,
            delay_s,
            jitter_s,
            drop_ratio,
        )
        await task

    try:
        asyncio.run(serve())
    except ConnectError as error:
        log.error("%s", error)
        return 3
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            log.info(
                "testbed stopped: forwarded %d, dropped %d", gateway.forwarded, gateway.dropped
            )
        return 130
    return 0
