"""The testbed's gateway: consumes vehicle telemetry and republishes it as platform events.

``vehicles/+/telemetry`` in, ``platform/events/{vin}`` out: the payload's fields, plus a
``meta`` envelope with the trace id, the receive time and the source topic. Knobs add
delay (with jitter) and drop a share of messages, so a probe has something to find.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from transport.errors import SendError
from transport.mqtt import BrokerTarget, InboundMessage, MqttSession

log = logging.getLogger(__name__)

MAX_PENDING = 100_000


@dataclass
class GatewayKnobs:
    """Faults the gateway adds: delay ± jitter before republishing, and a drop ratio."""

    delay_s: float = 0.0
    jitter_s: float = 0.0
    drop_ratio: float = 0.0


class Gateway:
    """Republishes each input message as an enveloped platform event."""

    def __init__(
        self,
        broker: BrokerTarget,
        knobs: GatewayKnobs | None = None,
        *,
        input_filter: str = "vehicles/+/telemetry",
        output_topic: str = "platform/events/{vin}",
        seed: int | None = None,
    ) -> None:
        self.broker = broker
        self.knobs = knobs or GatewayKnobs()
        self.input_filter = input_filter
        self.output_topic = output_topic
        self.forwarded = 0
        self.dropped = 0
        self._rng = random.Random(seed)
        self._ready = asyncio.Event()
        self._pending: set[asyncio.Task[None]] = set()

    async def wait_ready(self) -> None:
        """Return once the gateway's subscription is confirmed."""
        await self._ready.wait()

    async def run(self) -> None:
        """Consume and republish until cancelled."""
        async with MqttSession(
            self.broker, f"testbed-gateway-{self._rng.getrandbits(32):08x}"
        ) as session:
            codes = await session.subscribe([self.input_filter], qos=1)
            if codes[0] >= 0x80:
                raise RuntimeError(f"the broker refused the subscription to {self.input_filter}")
            self._ready.set()
            try:
                async for message in session.messages():
                    self._handle(session, message)
            finally:
                for task in self._pending:
                    task.cancel()

    def _handle(self, session: MqttSession, message: InboundMessage) -> None:
        knobs = self.knobs
        if knobs.drop_ratio and self._rng.random() < knobs.drop_ratio:
            self.dropped += 1
            return
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            log.warning("gateway backlog full; dropping")
            return
        try:
            payload = json.loads(message.payload)
        except ValueError:
            self.dropped += 1
            return
        if not isinstance(payload, dict):
            self.dropped += 1
            return
        vin = str(payload.get("vin") or message.topic.split("/")[1])
        payload["meta"] = {
            "trace_id": payload.get("trace_id"),
            "received_at": datetime.now(UTC)
            .isoformat(timespec="microseconds")
            .replace("+00:00", "Z"),
            "source_topic": message.topic,
        }
        delay = knobs.delay_s + (
            self._rng.uniform(-knobs.jitter_s, knobs.jitter_s) if knobs.jitter_s else 0.0
        )
        due_ns = message.seen_ns + round(max(0.0, delay) * 1e9)
        task = asyncio.create_task(
            self._forward(session, vin, json.dumps(payload).encode(), due_ns)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _forward(self, session: MqttSession, vin: str, body: bytes, due_ns: int) -> None:
        wait_s = (due_ns - time.monotonic_ns()) / 1e9
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        try:
            await session.publish(self.output_topic.replace("{vin}", vin), body, qos=0)
        except SendError as error:  # the testbed keeps serving; a lost event is the finding
            log.warning("gateway could not publish: %s", error)
            return
        self.forwarded += 1
