"""Send the fleet's signals to the broker: render, stamp, publish.

Sending is split in two so the caller can register a signal with the probes between the
stamp and the publish: :meth:`MqttPublisher.prepare` renders the payload and stamps the
send time (the moment the message is handed to the MQTT client), :meth:`MqttPublisher.send`
hands it over. A message seen by an observer can therefore never arrive before its signal
is known.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Literal

from simulator.fleet import Emission
from simulator.templates import PayloadTemplate, TextTemplate
from transport.mqtt import BrokerTarget, MqttSession

SessionMode = Literal["per_vehicle", "pooled"]

_CONNECTS_AT_ONCE = 64


@dataclass(frozen=True)
class SignalSpec:
    """How one kind of signal goes on the wire."""

    name: str
    topic: TextTemplate
    qos: int
    payload: PayloadTemplate


@dataclass(slots=True)
class Outgoing:
    """A rendered, stamped message that is about to be published."""

    emission: Emission
    topic: str
    payload: bytes
    qos: int
    sent_ns: int
    sent_wall_ns: int


def iso_utc(wall_ns: int) -> str:
    """``2026-11-22T10:00:00.123456Z`` for a wall-clock time in nanoseconds."""
    seconds, remainder = divmod(wall_ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{remainder // 1000:06d}Z"


class MqttPublisher:
    """Publishes signals over one session per vehicle (client id = VIN) or a small pool.

    Args:
        target: the broker.
        signals: how each signal kind is rendered.
        vins: the vehicles that will send.
        sessions: ``per_vehicle`` or ``pooled``.
        pool: the number of sessions when pooled.
    """

    def __init__(
        self,
        target: BrokerTarget,
        signals: Mapping[str, SignalSpec],
        vins: Iterable[str],
        *,
        sessions: SessionMode = "per_vehicle",
        pool: int = 4,
    ) -> None:
        self.target = target
        self.signals = dict(signals)
        self._vins = list(vins)
        # Round robin, not a hash of the VIN: under --shard every VIN shares one hash residue.
        self._slot = {vin: i % max(1, pool) for i, vin in enumerate(self._vins)}
        self._mode = sessions
        self._pool_size = max(1, pool)
        self._sessions: dict[str, MqttSession] = {}
        self._pool: list[MqttSession] = []
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> MqttPublisher:
        if self._mode == "per_vehicle":
            wanted = {vin: MqttSession(self.target, vin, inbound_limit=1) for vin in self._vins}
        else:
            token = os.urandom(3).hex()
            wanted = {
                str(i): MqttSession(self.target, f"fleetprobe-pool-{i}-{token}", inbound_limit=1)
                for i in range(self._pool_size)
            }
        gate = asyncio.Semaphore(_CONNECTS_AT_ONCE)

        async def connect(session: MqttSession) -> None:
            async with gate:
                await session.__aenter__()
            self._stack.push_async_exit(session.__aexit__)

        try:
            async with asyncio.TaskGroup() as group:
                for session in wanted.values():
                    group.create_task(connect(session))
        except BaseExceptionGroup as group_error:
            await self._stack.aclose()
            raise group_error.exceptions[0] from None
        except BaseException:  # cancelled (a startup timeout): close what did connect
            await self._stack.aclose()
            raise
        if self._mode == "per_vehicle":
            self._sessions = wanted
        else:
            self._pool = list(wanted.values())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    def prepare(self, emission: Emission, intended_ns: int) -> Outgoing:
        """Render ``emission`` and stamp it as sent now."""
        spec = self.signals[emission.signal]
        fields = emission.fields
        sent_ns = time.monotonic_ns()
        sent_wall_ns = time.time_ns()
        fields["sent_at"] = iso_utc(sent_wall_ns)
        fields["sent_at_ms"] = sent_wall_ns // 1_000_000
        fields["intended_at"] = iso_utc(sent_wall_ns - (sent_ns - intended_ns))
        return Outgoing(
            emission,
            spec.topic.render_text(fields),
            spec.payload.render_bytes(fields),
            spec.qos,
            sent_ns,
            sent_wall_ns,
        )

    async def send(self, outgoing: Outgoing) -> None:
        """Publish; with QoS 1 or 2, return once the broker acknowledged.

        Raises:
            SendError: the message could not be handed over (``reason`` says why).
        """
        emission = outgoing.emission
        await self._session_for(emission.vin).publish(
            outgoing.topic,
            outgoing.payload,
            qos=outgoing.qos,
            user_properties=(("traceparent", emission.fields["traceparent"]),),
            correlation_data=bytes.fromhex(emission.trace_id),
        )

    def _session_for(self, vin: str) -> MqttSession:
        if self._mode == "per_vehicle":
            return self._sessions[vin]
        return self._pool[self._slot[vin]]
