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
from typing import Any, ClassVar

from pydantic import BaseModel

from probes.tracker import Tracker
from transport.mqtt import BrokerTarget


class HopConfig(BaseModel, extra="forbid", frozen=True):
    """Base of the per-kind hop settings (the mapping under the kind's key)."""


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
    """What observers may use: the tracker, and where the platform is."""

    tracker: Tracker
    broker: BrokerTarget


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


class ObserverSetupError(Exception):
    """A hop cannot be observed as configured (e.g. the broker refused its subscription)."""
