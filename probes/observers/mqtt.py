"""The ``mqtt`` hop: a message on a topic carries the signal's trace id.

All mqtt hops share one client: one subscription per distinct filter, and each message is
routed to every hop whose filter matches it. The body is parsed once per message.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import field_validator, model_validator

from fleetprobe.core.queues import QueueState
from fleetprobe.probes.json_paths import PathText
from fleetprobe.probes.observers.base import (
    HopConfig,
    Observer,
    ObserverContext,
    ObserverSetupError,
    WatchedHop,
)
from fleetprobe.probes.trace_ids import (
    RETAINED,
    TOO_LARGE,
    TraceIdReader,
    Unmatched,
    one_source,
    parse_json,
)
from fleetprobe.transport.errors import ConnectError, NotAuthorizedError
from fleetprobe.transport.links import Backoff, LinkStats
from fleetprobe.transport.mqtt import InboundMessage, MqttSession
from fleetprobe.transport.mqtt_broker_info import BrokerCapabilities
from fleetprobe.transport.topics import check_topic_filter, topic_matches

log = logging.getLogger("fleetprobe")

_UNPARSED = object()
INBOUND_LIMIT = 100_000
"""Received messages that may wait for the tracker; past it they are dropped and counted."""


class MqttHop(HopConfig):
    """``mqtt: {topic: FILTER, trace_id: $.path | property: NAME}``."""

    topic: str
    trace_id: PathText | None = None
    property: str | None = None

    @field_validator("topic")
    @classmethod
    def _valid_filter(cls, topic: str) -> str:
        check_topic_filter(topic)
        return topic

    @model_validator(mode="after")
    def _one_trace_id_source(self) -> MqttHop:
        one_source(self.trace_id, self.property, "property")
        return self

    def problems(
        self, mqtt_protocol: str, base_dir: Path | None
    ) -> Iterator[tuple[tuple[str, ...], str]]:
        if mqtt_protocol == "3.1.1" and self.property is not None:
            yield (
                ("property",),
                "MQTT 3.1.1 has no user properties: use protocol 5 or trace_id: $.path",
            )


class _Route:
    """One watched hop and how it reads the trace id."""

    __slots__ = ("chain_index", "hop_index", "trace_id")

    def __init__(self, hop: WatchedHop) -> None:
        config: MqttHop = hop.config
        self.chain_index, self.hop_index = hop.chain_index, hop.hop_index
        self.trace_id = TraceIdReader(config.trace_id, config.property)


class MqttObserver(Observer, kind="mqtt", config=MqttHop):
    """Subscribes to every mqtt hop's filter with one client and marks what arrives."""

    def __init__(self, hops: list[WatchedHop], context: ObserverContext) -> None:
        super().__init__(hops, context)
        self._routes: dict[str, list[_Route]] = {}
        for hop in self.hops:
            self._routes.setdefault(hop.config.topic, []).append(_Route(hop))
        self._client_id = f"fleetprobe-observer-{os.urandom(4).hex()}"
        self._filter_of_id = dict(enumerate(self._routes, start=1))
        self._session: MqttSession | None = None
        self._closing = False
        self._link = LinkStats("observer", expected=1)

    @property
    def queue(self) -> QueueState:
        session = self._session
        if session is None:
            return QueueState(0, INBOUND_LIMIT, 0)
        return QueueState(session.inbound_waiting, INBOUND_LIMIT, session.inbound_dropped)

    @property
    def link(self) -> LinkStats:
        return self._link

    def watermark(self, now_ns: int) -> int:
        session = self._session
        since = session.behind_since_ns if session is not None else None
        return now_ns if since is None else min(now_ns, since)

    async def start(self) -> None:
        self._session = MqttSession(
            self.context.broker,
            self._client_id,
            inbound_limit=INBOUND_LIMIT,
            on_backlog=self._on_backlog if self.context.blind is not None else None,
        )
        await self._session.__aenter__()
        try:
            self._check_capabilities(self._session.broker)
            await self._subscribe(self._session)
        except BaseException:
            await self._session.disconnect()
            raise
        self._link.broker = self._session.broker.as_dict()
        self._link.up()

    async def run(self) -> None:
        """Mark what arrives; when the broker goes away, connect and subscribe again
        (backing off with jitter) and go on. Hops time out for what was missed meanwhile."""
        while True:
            assert self._session is not None
            try:
                async for message in self._session.messages():
                    self._mark(message)
            except ConnectError as error:
                if self._closing:
                    return
                log.warning("the MQTT observer lost the broker (%s); reconnecting", error)
            self._link.lost()
            await self._reconnect(self._session)
            self._link.reconnected(resumed=self._session.session_present)
            log.info("the MQTT observer is subscribed again")

    async def close(self) -> None:
        self._closing = True
        session, self._session = self._session, None
        if session is not None:
            await session.disconnect()

    async def _reconnect(self, session: MqttSession) -> None:
        # One session, no herd to spread out: come back soon, since every signal that
        # passes meanwhile is one this hop cannot see.
        backoff = Backoff(first_s=0.05, cap_s=0.5)
        while True:
            await asyncio.sleep(backoff.next_s())
            try:
                await session.reconnect()
                if not session.session_present:  # a resumed session kept its subscriptions
                    await self._subscribe(session)
                return
            except NotAuthorizedError:
                raise  # the credentials will not get better by retrying
            except ConnectError as error:
                log.debug("the MQTT observer could not reconnect: %s", error)

    def _check_capabilities(self, broker: BrokerCapabilities) -> None:
        """Refuse filters the broker announced it does not take (MQTT 5 CONNACK)."""
        for hop in self.hops:
            topic = hop.config.topic
            if not broker.wildcard_subscriptions and ("+" in topic or "#" in topic):
                missing = "wildcard subscriptions"
            elif not broker.shared_subscriptions and topic.startswith("$share/"):
                missing = "shared subscriptions"
            else:
                continue
            raise ObserverSetupError(
                f"hop {hop.chain} > {hop.hop}: the broker does not offer {missing} (its "
                f"CONNACK says so), so it cannot subscribe to {topic}"
            )

    async def _subscribe(self, session: MqttSession) -> None:
        filters = list(self._routes)
        codes = await session.subscribe(filters, qos=1, identify=True)
        refused = [f for f, code in zip(filters, codes, strict=True) if code >= 0x80]
        if refused:
            names = ", ".join(
                f"{h.chain} > {h.hop}" for h in self.hops if h.config.topic in refused
            )
            raise ObserverSetupError(
                f"the broker refused the subscription to {', '.join(refused)} (hops: {names})"
            )

    def _on_backlog(self, since_ns: int, end_ns: int | None) -> None:
        """The session fell behind the broker (``end_ns`` None) or caught up."""
        blind = self.context.blind
        assert blind is not None
        if end_ns is None:
            blind.open(self._client_id, since_ns)
        else:
            blind.close(self._client_id, end_ns, since_ns)

    def _matching_routes(self, message: InboundMessage) -> list[list[_Route]]:
        """The routes of the filters this copy of the message was delivered for."""
        if message.subscription_ids:  # MQTT 5: exactly the subscriptions that matched
            return [
                self._routes[self._filter_of_id[i]]
                for i in message.subscription_ids
                if i in self._filter_of_id
            ]
        return [
            routes
            for topic_filter, routes in self._routes.items()
            if topic_matches(topic_filter, message.topic)
        ]

    def _mark(self, message: InboundMessage) -> None:
        tracker = self.context.tracker
        body: Any = _UNPARSED  # parsed lazily, once
        for routes in self._matching_routes(message):
            for route in routes:
                if message.retain:
                    # A retained message is old state replayed on subscribe, not a sighting.
                    tracker.unmatched(route.chain_index, route.hop_index, RETAINED)
                    continue
                if message.cut_from:
                    tracker.unmatched(route.chain_index, route.hop_index, TOO_LARGE)
                    continue
                if body is _UNPARSED:
                    body = parse_json(message.payload)
                try:
                    trace_id = route.trace_id.read(body, message.user_properties)
                except Unmatched as unmatched:
                    tracker.unmatched(route.chain_index, route.hop_index, unmatched.reason)
                    continue
                tracker.observe(route.chain_index, route.hop_index, trace_id, message.seen_ns, body)
