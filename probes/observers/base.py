"""What every hop kind shares: the observer base class and its registry.

An observer turns what it sees into marks for the tracker: ``(trace_id, hop, seen_at,
body)``. It never judges. Each hop kind lives in one module of this package, defines its
config model and subclasses :class:`Observer` with ``kind=`` and ``config=``; that is all
it takes for the scenario loader to accept the kind and for a run to start it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from fleetprobe.core.errors import FleetprobeError
from fleetprobe.core.queues import QueueState
from fleetprobe.probes.tracker import Tracker
from fleetprobe.transport.links import LinkStats
from fleetprobe.transport.mqtt import BrokerTarget


class HopConfig(BaseModel, extra="forbid", frozen=True):
    """Base of the per-kind hop settings (the mapping under the kind's key)."""

    def template_fields(self) -> frozenset[str]:
        """The signal fields this hop's templates use (a URL per signal needs them)."""
        return frozenset()

    @property
    def latest_only(self) -> bool:
        """Whether the hop shows only each vehicle's latest signal (a state API)."""
        return False


class ObserverStats(Protocol):
    """Counts of what observers met besides marks (they become metrics and report keys)."""

    def poll_error(self, chain_index: int, hop_index: int, reason: str) -> None:
        """A poll got no usable answer (404, 503, timeout, a body without the id, ...)."""

    def webhook_rejected(self, chain_index: int, hop_index: int, reason: str) -> None:
        """A webhook call was refused (bad signature, body too large, ...)."""


@dataclass(frozen=True)
class WatchedHop:
    """A hop that an observer watches, with its place in the scenario."""

    chain_index: int
    hop_index: int
    chain: str
    hop: str
    config: Any  # the kind's HopConfig subclass


@dataclass(frozen=True)
class ObserverContext:
    """What observers may use: the tracker, where the platform is, where to listen."""

    tracker: Tracker
    broker: BrokerTarget
    stats: ObserverStats
    webhook_listen: tuple[str, int] = ("127.0.0.1", 9465)


class Observer(ABC):
    """Watches every hop of one kind and reports marks to the tracker.

    Subclass with ``class Mqtt(Observer, kind="mqtt", config=MqttHop)``.
    """

    kind: ClassVar[str]
    config_model: ClassVar[type[HopConfig]]
    registry: ClassVar[dict[str, type[Observer]]] = {}

    def __init_subclass__(cls, *, kind: str, config: type[HopConfig], **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.kind, cls.config_model = kind, config
        Observer.registry[kind] = cls

    def __init__(self, hops: Sequence[WatchedHop], context: ObserverContext) -> None:
        self.hops = tuple(hops)
        self.context = context

    @abstractmethod
    async def start(self) -> None:
        """Connect and return once listening (subscriptions confirmed, servers bound).

        Raises:
            transport.errors.ConnectError: the platform cannot be reached.
            ObserverSetupError: a hop is misconfigured for this platform.
        """

    @abstractmethod
    async def run(self) -> None:
        """Observe until cancelled."""

    async def close(self) -> None:  # noqa: B027 - most kinds have nothing to release
        """Release connections; called once after :meth:`run` ended."""

    @property
    def queue(self) -> QueueState | None:
        """Its queue of received messages waiting for the tracker, if it has one. What a full
        queue turns away is the prober's loss: the hops they were for time out."""
        return None

    @property
    def link(self) -> LinkStats | None:
        """The observer's MQTT sessions, if it has any: up, reconnects, outages."""
        return None


class ObserverSetupError(FleetprobeError):
    """A hop cannot be observed as configured (e.g. the broker refused its subscription)."""
