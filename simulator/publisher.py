"""Send the fleet's signals to the broker: render, stamp, publish.

Sending is split in two so the caller can register a signal with the probes between the
stamp and the publish: :meth:`MqttPublisher.prepare` renders the payload and stamps the
send time (the moment the message is handed to the MQTT client), :meth:`MqttPublisher.send`
hands it over. A message seen by an observer can therefore never arrive before its signal
is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from fleetprobe.core.times import iso_utc
from fleetprobe.simulator.fleet import Emission
from fleetprobe.simulator.templates import PayloadTemplate, TextTemplate
from fleetprobe.transport.errors import ConnectError, NotAuthorizedError, SendError
from fleetprobe.transport.links import Backoff, LinkStats
from fleetprobe.transport.mqtt import UNACKNOWLEDGED, BrokerTarget, MqttSession
from fleetprobe.transport.mqtt_broker_info import (
    DUPLICATE_CLIENT_ID,
    UNKNOWN,
    give_up_reason,
)
from fleetprobe.transport.mqtt_session_state import PROTOCOL_ERROR

SessionMode = Literal["per_vehicle", "pooled"]

_CONNECTS_AT_ONCE = 64
_RECONNECT_FIRST_PAUSE_S = 0.1
_RECONNECT_MAX_PAUSE_S = 5.0
_TALLY_EVERY_S = 1.0
_QUICK_LOSS_NS = 1_000_000_000
_QUICK_LOSSES_TO_GIVE_UP = 3
"""A session the broker closes this many times in a row, each within a second of
connecting and without a reason code, is given up as ``unknown``: something keeps closing
it (another client with its id, an ACL, a limit) and the broker does not say what."""
READY_WAIT_S = 5.0
"""How long a send waits for its session to reconnect before it fails."""

log = logging.getLogger("fleetprobe")


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
        vins = list(vins)
        if sessions == "per_vehicle":
            self._key_of = {vin: vin for vin in vins}
            self._client_ids = {vin: vin for vin in vins}
        else:
            # Round robin, not a hash of the VIN: under --shard every VIN shares one residue.
            size = max(1, pool)
            self._key_of = {vin: str(i % size) for i, vin in enumerate(vins)}
            token = os.urandom(3).hex()
            self._client_ids = {str(i): f"fleetprobe-pool-{i}-{token}" for i in range(size)}
        self._sessions: dict[str, MqttSession] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._closing = False
        self._given_up: dict[str, str] = {}
        self._connected_ns: dict[str, int] = {}
        self._quick_losses: dict[str, int] = {}
        self._lost_tally = _Tally("%d MQTT session(s) of the fleet lost; reconnecting")
        self._unacknowledged_tally = _Tally(
            f"%d QoS 1/2 publish(es) to {target.url.replace('%', '%%')} got no acknowledgement "
            f"within {target.ack_timeout_s:g}s: the broker "
            "is not acknowledging; they count as send errors unacknowledged"
        )
        self._given_up_tallies: dict[str, _Tally] = {}
        self._protocol_tally: _Tally | None = None
        self._rng = random.Random()
        self.link = LinkStats("fleet", expected=len(self._client_ids))

    async def __aenter__(self) -> MqttPublisher:
        gate = asyncio.Semaphore(_CONNECTS_AT_ONCE)

        async def connect(key: str) -> None:
            async with gate:
                await self._connect(key)

        try:
            async with asyncio.TaskGroup() as group:
                for key in self._client_ids:
                    group.create_task(connect(key))
        except BaseExceptionGroup as group_error:
            await self._close_all()
            raise group_error.exceptions[0] from None
        except BaseException:  # cancelled (a startup timeout): close what did connect
            await self._close_all()
            raise
        try:
            self._check_qos()
        except ConnectError:
            await self._close_all()
            raise
        return self

    def _check_qos(self) -> None:
        """Refuse, before anything is sent, signals above the broker's Maximum QoS (or say
        that they will be lowered to it, with ``downgrade_qos``)."""
        broker = next(iter(self._sessions.values())).broker
        maximum = broker.maximum_qos
        too_high = sorted(name for name, spec in self.signals.items() if spec.qos > maximum)
        if not too_high:
            return
        names = ", ".join(too_high)
        if self.target.downgrade_qos:
            log.warning(
                "the broker allows at most QoS %d: signal(s) %s go at QoS %d",
                maximum,
                names,
                maximum,
            )
            return
        raise ConnectError(
            self.target.url,
            f"the broker allows at most QoS {maximum} (its CONNACK's Maximum QoS), but "
            f"signal(s) {names} ask for more: set their qos to {maximum}, or "
            f"target.mqtt.downgrade_qos: true to send them at QoS {maximum}",
            reason="qos_not_supported",
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close_all()

    async def _connect(self, key: str, *, again: bool = False) -> None:
        session = self._sessions.get(key)
        resent_before = 0
        if session is None:
            session = MqttSession(self.target, self._client_ids[key], inbound_limit=1)
            await session.__aenter__()
            self._sessions[key] = session
            self.link.broker = session.broker.as_dict()
        else:
            resent_before = session.resent
            await session.reconnect()  # the same session: a persistent one resumes
        self._connected_ns[key] = time.monotonic_ns()
        self._ready.setdefault(key, asyncio.Event()).set()
        self._watchers[key] = asyncio.create_task(self._reconnect_when_lost(key, session))
        if again:
            self.link.reconnected(
                resumed=session.session_present, resent=session.resent - resent_before
            )
        else:
            self.link.up()

    async def _reconnect_when_lost(self, key: str, session: MqttSession) -> None:
        """A vehicle whose connection drops connects again, as real ones do; until it is
        back, its sends wait (and fail after READY_WAIT_S)."""
        await session.wait_disconnected()
        if self._closing or self._sessions.get(key) is not session:
            return  # closed on purpose
        self.link.lost()
        self._ready[key].clear()
        code = session.disconnect_code
        quick = time.monotonic_ns() - self._connected_ns[key] < _QUICK_LOSS_NS
        self._quick_losses[key] = self._quick_losses.get(key, 0) + 1 if quick else 0
        # The broker's reason decides (MQTT 5: taken over by another client with this id,
        # a QoS it refuses, moved elsewhere); without one, a session closed moments after
        # each connect, again and again, is given up for a cause nobody named.
        reason = give_up_reason(code)
        if reason is None and code is None and self._quick_losses[key] >= _QUICK_LOSSES_TO_GIVE_UP:
            reason = UNKNOWN
        if reason is not None:
            self._give_up(key, reason, None if code is None else session.close_reason)
            await self._drop(key, reason)
            return
        self._lost_tally.add()
        await self._come_back(key)

    async def _come_back(self, key: str) -> None:
        """Connect ``key`` again, backing off with jitter, until it is back or given up."""
        backoff = Backoff(_RECONNECT_FIRST_PAUSE_S, _RECONNECT_MAX_PAUSE_S, self._rng)
        while not self._closing:
            await asyncio.sleep(backoff.next_s())  # jittered: vehicles do not return at once
            if await self._try_connect(key):
                return

    async def _try_connect(self, key: str) -> bool:
        """Connect ``key`` again once; True when that settled it (back, or given up)."""
        try:
            await self._connect(key, again=True)
        except NotAuthorizedError:
            self._give_up(key, "not_authorized", None)  # retrying will not change it
            await self._drop(key, "not_authorized")
        except ConnectError:
            return False
        return True

    def _give_up(self, key: str, reason: str, broker_said: str | None) -> None:
        """Stop reconnecting ``key``: ``broker_said`` is the broker's DISCONNECT in words
        (None: it gave no reason)."""
        self._given_up[key] = reason
        tally = self._given_up_tallies.get(reason)
        if tally is None:
            tally = self._given_up_tallies[reason] = _Tally(_given_up_message(reason, broker_said))
        tally.add()
        self.link.given_up()

    async def _drop(self, key: str, reason: str) -> None:
        """Close a given-up session: what it still had in flight fails for ``reason``;
        the session is not ended at the broker, since it may now be another client's."""
        session = self._sessions.pop(key)
        session.forget_flows(f"not sent: the session was given up ({reason})", reason)
        await session.disconnect(end_session=False)

    def given_up(self, vin: str) -> str | None:
        """Why the vehicle's session will not come back (None: it is up or reconnecting)."""
        return self._given_up.get(self._key_of[vin])

    async def _close_all(self) -> None:
        self._closing = True
        tallies = [self._lost_tally, self._unacknowledged_tally, self._protocol_tally]
        for tally in [*tallies, *self._given_up_tallies.values()]:
            if tally is not None:
                tally.flush()
        watchers, self._watchers = self._watchers, {}
        for watcher in watchers.values():
            watcher.cancel()
        await asyncio.gather(*watchers.values(), return_exceptions=True)
        sessions, self._sessions = self._sessions, {}
        gate = asyncio.Semaphore(_CONNECTS_AT_ONCE)  # ending 3.1.1 persistent ones connects

        async def close(session: MqttSession) -> None:
            async with gate:
                await session.disconnect()

        await asyncio.gather(*(close(session) for session in sessions.values()))

    def ready(self, vin: str) -> bool:
        """Whether the vehicle's session is connected (not reconnecting)."""
        return self._ready[self._key_of[vin]].is_set()

    async def wait_ready(self, vin: str) -> None:
        """Return once the vehicle's session is connected."""
        await self._ready[self._key_of[vin]].wait()

    async def reconnect_all(self, jitter_s: float, rng: random.Random) -> int:
        """Drop every session at once and connect each again after a uniform draw from
        ``[0, jitter_s]``, as a fleet does after an outage; return the sessions dropped.
        A session that cannot connect at its time comes back later, backing off as after
        any loss."""
        keys = list(self._sessions)
        for key in keys:
            self._ready[key].clear()
            self.link.lost()
            self._watchers.pop(key).cancel()  # this loss is the storm's, not the broker's
        sessions = [self._sessions[key] for key in keys]
        await asyncio.gather(*(s.disconnect(end_session=False) for s in sessions))

        async def back(key: str, delay_s: float) -> None:
            await asyncio.sleep(delay_s)  # the storm's jitter itself
            if not await self._try_connect(key) and not self._closing:
                self._watchers[key] = asyncio.create_task(self._come_back(key))

        delays = [rng.uniform(0, jitter_s) if jitter_s else 0.0 for _ in keys]
        await asyncio.gather(*(back(key, delay) for key, delay in zip(keys, delays, strict=True)))
        return len(keys)

    def prepare(self, emission: Emission, intended_ns: int, *, clock_skew_ns: int = 0) -> Outgoing:
        """Render ``emission`` and stamp it as sent now.

        ``clock_skew_ns`` puts the vehicle's clock off by that much: it shows in the
        payload's times only, never in the times fleetprobe measures with.
        """
        spec = self.signals[emission.signal]
        fields = emission.fields
        sent_ns = time.monotonic_ns()
        sent_wall_ns = time.time_ns()
        vehicle_wall_ns = sent_wall_ns + clock_skew_ns
        fields["sent_at"] = iso_utc(vehicle_wall_ns)
        fields["sent_at_ms"] = vehicle_wall_ns // 1_000_000
        fields["intended_at"] = iso_utc(vehicle_wall_ns - (sent_ns - intended_ns))
        return Outgoing(
            emission,
            spec.topic.render_text(fields),
            spec.payload.render_bytes(fields),
            spec.qos,
            sent_ns,
            sent_wall_ns,
        )

    @contextlib.asynccontextmanager
    async def send_slot(self, vin: str, qos: int) -> AsyncIterator[None]:
        """Room to send ``vin``'s next QoS ``qos`` message now (see
        :meth:`MqttSession.send_slot`): :meth:`prepare` inside it, so that the wait for a
        free in-flight slot is the prober's, never the broker's.

        Raises:
            SendError: the vehicle's session is not back within ``READY_WAIT_S``.
        """
        await self._until_ready(vin)
        async with self._session_for(vin).send_slot(qos):
            yield

    async def writable(self, vin: str) -> None:
        """Return once ``vin``'s session can take more bytes (QoS 0 waits only for this)."""
        await self._session_for(vin).writable()

    async def send(self, outgoing: Outgoing, *, slot_held: bool = False) -> None:
        """Publish; with QoS 1 or 2, return once the broker acknowledged.

        ``slot_held``: sent inside :meth:`send_slot`.

        Raises:
            SendError: the message could not be handed over (``reason`` says why).
        """
        emission = outgoing.emission
        await self._until_ready(emission.vin)
        try:
            await self._session_for(emission.vin).publish(
                outgoing.topic,
                outgoing.payload,
                qos=outgoing.qos,
                user_properties=(("traceparent", emission.fields["traceparent"]),),
                correlation_data=bytes.fromhex(emission.trace_id),
                slot_held=slot_held,
            )
        except SendError as error:
            if error.reason == UNACKNOWLEDGED:
                self.link.unacknowledged += 1
                self._unacknowledged_tally.add()
            elif error.reason == PROTOCOL_ERROR:
                self.link.protocol_errors += 1
                if self._protocol_tally is None:  # worded after the first one
                    self._protocol_tally = _Tally(
                        f"%d publish(es) answered out of protocol; the first: "
                        f"{str(error).replace('%', '%%')}; they count as send errors "
                        "protocol_error (or keep their verdict where a hop saw them)"
                    )
                self._protocol_tally.add()
            raise

    async def _until_ready(self, vin: str) -> None:
        if self.ready(vin):
            return
        try:
            async with asyncio.timeout(READY_WAIT_S):
                await self.wait_ready(vin)
        except TimeoutError:
            raise SendError(f"vehicle {vin}: not connected", reason="disconnected") from None

    def _session_for(self, vin: str) -> MqttSession:
        return self._sessions[self._key_of[vin]]


def _given_up_message(reason: str, broker_said: str | None) -> str:
    """The log line of sessions given up for ``reason`` (``%d``: how many)."""
    if broker_said is not None:
        why = f"{broker_said}, which connecting again cannot change"
        if reason == DUPLICATE_CLIENT_ID:
            why += " (another run of this fleet?)"
    elif reason == UNKNOWN:
        why = (
            "the broker closed each of them within 1 s of connecting, three times in a row, "
            "without saying why (MQTT 3.1.1 has no reason codes, and some MQTT 5 brokers "
            "give none): another client with the same client id, a QoS or topic it "
            "refuses, or a limit of the broker"
        )
    else:
        why = "the broker refused the credentials on reconnecting"
    return (
        f"%d MQTT session(s) of the fleet given up: {why.replace('%', '%%')}; "
        f"their signals count as send errors {reason}"
    )


class _Tally:
    """Counts events of one kind and logs them as one line a second: a fleet loses its
    sessions together, and one line per vehicle would bury everything else."""

    def __init__(self, message: str) -> None:
        self._message = message
        self._count = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self) -> None:
        self._count += 1
        if self._count == 1:
            self._timer = asyncio.get_running_loop().call_later(_TALLY_EVERY_S, self.flush)

    def flush(self) -> None:
        """Log what was counted since the last line (at the end too: nothing goes unsaid)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._count:
            log.warning(self._message, self._count)
            self._count = 0
