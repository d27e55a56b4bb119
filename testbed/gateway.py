"""The testbed's gateway: consumes vehicle signals and republishes them as platform events.

``vehicles/+/+`` in, ``platform/events/{vin}`` out: the payload's fields, plus a ``meta``
envelope with the trace id, the receive time and the source topic. Its knobs add delay
(with jitter), drop a share of messages, and stall (messages wait, in a bounded backlog,
until the stall ends), so a probe has something to find.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

from fleetprobe.testbed.events import envelope
from fleetprobe.testbed.knobs import StageKnobs
from fleetprobe.testbed.stage import Counters, StageRunner
from fleetprobe.testbed.topics import topic_for, valid_vin, vin_from_topic
from fleetprobe.transport.errors import SendError
from fleetprobe.transport.mqtt import BrokerTarget, InboundMessage, MqttSession

log = logging.getLogger(__name__)

STAGE = "gateway"
MAX_PENDING = 100_000


class Gateway:
    """Republishes each input message as an enveloped platform event.

    Args:
        broker: the broker to consume from and publish to.
        knobs: the gateway's faults; read for every message, so they may change while
            it runs. New knobs seeded with ``seed`` when None.
        input_filter: what to consume; its first ``+`` level is the VIN when the payload
            has no ``vin``.
        output_topic: where to publish, with ``{vin}``.
        seed: seeds the knobs' random draws when ``knobs`` is None.
        counters: where to count (a private :class:`Counters` when None).
        backlog: messages held (delayed or stalled) at most; more are dropped and counted.
    """

    def __init__(
        self,
        broker: BrokerTarget,
        knobs: StageKnobs | None = None,
        *,
        input_filter: str = "vehicles/+/+",
        output_topic: str = "platform/events/{vin}",
        seed: int | None = None,
        counters: Counters | None = None,
        backlog: int = MAX_PENDING,
    ) -> None:
        self.broker = broker
        self.knobs = knobs if knobs is not None else StageKnobs(seed=seed)
        self.input_filter = input_filter
        self.output_topic = output_topic
        self.counters = counters if counters is not None else Counters()
        self._stage = StageRunner(STAGE, self.knobs, self.counters, backlog=backlog)
        self._ready = asyncio.Event()

    @property
    def forwarded(self) -> int:
        """Events published."""
        return self.counters.get(STAGE, "forwarded")

    @property
    def dropped(self) -> int:
        """Messages not republished: dropped by the knob, past the backlog, or unusable."""
        return sum(
            self.counters.get(STAGE, key)
            for key in ("dropped", "backlog_full", "bad_payload", "bad_vin", "publish_failed")
        )

    async def wait_ready(self) -> None:
        """Return once the gateway's subscription is confirmed."""
        await self._ready.wait()

    async def run(self) -> None:
        """Consume and republish until cancelled.

        Raises:
            ConnectError: the broker cannot be reached or the connection was lost.
            RuntimeError: the broker refused the subscription.
        """
        # A random client id: two testbeds with one seed must not take over each other's.
        async with MqttSession(self.broker, f"testbed-gateway-{uuid.uuid4().hex[:12]}") as session:
            codes = await session.subscribe([self.input_filter], qos=1)
            if codes[0] >= 0x80:
                raise RuntimeError(f"the broker refused the subscription to {self.input_filter}")
            self._ready.set()
            try:
                async for message in session.messages():
                    self._handle(session, message)
            finally:
                await self._stage.aclose()

    def _handle(self, session: MqttSession, message: InboundMessage) -> None:
        self.counters.add(STAGE, "received")
        try:
            payload = json.loads(message.payload)
        except ValueError:
            self.counters.add(STAGE, "bad_payload")
            return
        if not isinstance(payload, dict):
            self.counters.add(STAGE, "bad_payload")
            return
        vin = str(payload.get("vin") or vin_from_topic(self.input_filter, message.topic) or "")
        if not valid_vin(vin):
            self.counters.add(STAGE, "bad_vin")
            return
        body = json.dumps(envelope(payload, message.topic)).encode()
        topic = topic_for(self.output_topic, vin)

        async def forward() -> None:
            try:
                await session.publish(topic, body, qos=0)
            except SendError as error:  # the testbed keeps serving; a lost event is the finding
                self.counters.add(STAGE, "publish_failed")
                log.warning("gateway could not publish: %s", error)
                return
            self.counters.add(STAGE, "forwarded")

        self._stage.submit(forward, arrived_ns=message.seen_ns)
