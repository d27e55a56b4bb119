"""What every hop kind shares: the observer base class and its registry.

An observer turns what it sees into marks for the tracker: ``(trace_id, hop, seen_at,
body)``. It never judges. What goes wrong on its own side (a poll that fails, a webhook
call it refuses) it reports as a hop error with a reason of its kind's own, which every
output shows without knowing the kind.

Each hop kind lives in one module of this package, defines its config model and subclasses
:class:`Observer` with ``kind=`` and ``config=``; that is all it takes for the scenario
loader to accept the kind and for a run to start it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from fleetprobe.core.blind_spans import BlindSpans
from fleetprobe.core.errors import FleetprobeError
from fleetprobe.core.events import RunEvents
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

    @property
    def receives_webhooks(self) -> bool:
        """Whether the hop is served by the run's webhook receiver (one listen address, so
        shard processes cannot share it)."""
        return False

    def problems(
        self, mqtt_protocol: str, base_dir: Path | None
    ) -> Iterator[tuple[tuple[str, ...], str]]:
        """What this hop cannot do against the fleet's broker speaking ``mqtt_protocol``
        (``5`` or ``3.1.1``), or with its input files (relative to ``base_dir``, the
        scenario's folder; None: not from a file): the path below the kind's key and the
        message, for each."""
        return iter(())

    def located(self, base_dir: Path) -> HopConfig:
        """These settings with their input files found from ``base_dir`` (the scenario's
        folder), as the run opens them."""
        return self


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
    """What observers may use: the tracker (for marks), where the platform is, the run's
    events (for a hop kind's own errors, :meth:`RunEvents.hop_error`), where to listen, and
    where to note when they fell behind what reached them (their blind spans)."""

    tracker: Tracker
    broker: BrokerTarget
    events: RunEvents
    webhook_listen: tuple[str, int] = ("127.0.0.1", 9465)
    blind: BlindSpans | None = None


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

    def watermark(self, now_ns: int) -> int:
        """The time up to which the observer has handed the tracker everything that
        reached it (monotonic ns): no deadline after it may expire yet. Default: now (it
        hands each arrival over as it comes)."""
        return now_ns

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
