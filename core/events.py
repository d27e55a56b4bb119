"""The events of a run, and the fan-out that hands each one to every output.

A run emits each event once, at the one place where it happens: the emitter (a signal
sent or not sent), the tracker (a verdict, a retired signal, a duplicate, an unmatched
message), an observer (its hop kind's own error), the health watch (a hop up or down), the
fault timeline (a fault in force or over). Every output — metrics, the result book,
health, the ledger of expected outcomes, the trace log, alerts, views — is a sink: it
subclasses :class:`RunEvents` and overrides the events it reads. The run builds one
:class:`RunEventFanout` of its sinks and hands that to whoever emits.

Events carry positions (``chain_index``, ``hop_index``) into the scenario's chains as the
tracker numbers them; a sink that needs names keeps the chains it was built with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fleetprobe.core.results import FollowedSignal
from fleetprobe.core.times import iso_utc


@dataclass(frozen=True)
class HealthChange:
    """A hop went up or down.

    Attributes:
        chain: the chain's name.
        hop: the hop's name.
        up: the hop's new state.
        at_wall_ns: when the change was found, on the wall clock.
        success_ratio: the share of ok results in the window at that moment.
        samples: how many results the window held.
        first_failing_hop: the first hop of the chain, in chain order, that was down after
            this evaluation (the root of a cascade), or None.
        window_s: the window the ratio is over.
        objective: the ratio a hop needs to be up.
    """

    chain: str
    hop: str
    up: bool
    at_wall_ns: int
    success_ratio: float
    samples: int
    first_failing_hop: str | None
    window_s: float
    objective: float

    def describe(self) -> str:
        """One line for a log or an alert, e.g. ``hop c > api is DOWN: 61.0% ok ...``."""
        return (
            f"hop {self.chain} > {self.hop} is {'UP' if self.up else 'DOWN'}: "
            f"{self.success_ratio:.1%} ok over the last {self.window_s:g}s "
            f"(objective {self.objective:.1%}); "
            f"first failing hop: {self.first_failing_hop or 'none'}"
        )

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with the time in ISO-8601 UTC."""
        return {
            "chain": self.chain,
            "hop": self.hop,
            "state": "up" if self.up else "down",
            "at": iso_utc(self.at_wall_ns),
            "success_ratio": round(self.success_ratio, 6),
            "samples": self.samples,
            "window_s": self.window_s,
            "objective": self.objective,
            "first_failing_hop": self.first_failing_hop,
        }


class RunEvents:
    """Every event of a run; each method does nothing here.

    A sink subclasses this and overrides what it reads. Handlers run on the loop that
    timestamps sightings, so they must be quick and must not raise.
    """

    def signal_sent(self, signal: str, lag_s: float | None) -> None:
        """A ``signal`` was handed to the MQTT client ``lag_s`` after it was due (None:
        late on purpose, held back by a fault of the fleet)."""

    def not_sent(self, signal: str, reason: str, chains: Sequence[int]) -> None:
        """A ``signal`` could not be sent, for ``reason`` (a bounded token); ``chains``
        would have followed it: each counts it as unsent."""

    def not_followed(self, signal: str, reason: str, chains: Sequence[int]) -> None:
        """A ``signal`` was sent but ``chains`` do not follow it, for ``reason`` (the
        prober could not keep up: ``saturated``)."""

    def verdict(self, followed: FollowedSignal) -> None:
        """``followed`` is judged: every hop has its result (or the run was interrupted and
        the verdict is ``aborted``; or the prober could not judge a hop and it is
        ``inconclusive``). Hop results arrive with the verdict, never alone."""

    def retired(self, followed: FollowedSignal) -> None:
        """``followed`` leaves the tracker after its chain's last deadline; nothing about
        it changes after this."""

    def duplicate(self, chain_index: int, hop_index: int) -> None:
        """A hop saw a signal again."""

    def unmatched(self, chain_index: int, hop_index: int, reason: str) -> None:
        """A hop saw a message it cannot match to a followed signal, for ``reason``."""

    def hop_error(self, chain_index: int, hop_index: int, reason: str) -> None:
        """A hop's observer met an error of its kind (a failed poll, a refused webhook
        call, ...); ``reason`` is a bounded token the hop kind defines."""

    def health_changed(self, change: HealthChange) -> None:
        """A hop went up or down."""

    def fault_changed(self, fault: str, active: bool) -> None:
        """A fault of the timeline took effect (``active``) or ended."""


EVENTS = tuple(name for name in vars(RunEvents) if not name.startswith("_"))
"""The names of every event, in the order they are declared."""


class RunEventFanout(RunEvents):
    """Hands each event to every sink that overrides it, in the order the sinks were given.

    Built once per run: each event becomes the one handler of the only sink that reads it,
    or a loop over the few that do, so an event nobody reads costs one no-op call.
    """

    def __init__(self, sinks: Iterable[RunEvents] = ()) -> None:
        self.sinks: tuple[RunEvents, ...] = ()
        for sink in sinks:
            self.add(sink)

    def add(self, sink: RunEvents) -> None:
        """Hand every later event to ``sink`` too (an output that opens after the start)."""
        self.sinks = (*self.sinks, sink)
        for name in EVENTS:
            handlers = tuple(
                getattr(each, name)
                for each in self.sinks
                if getattr(type(each), name) is not getattr(RunEvents, name)
            )
            setattr(self, name, _fan_out(handlers))


def _fan_out(handlers: tuple[Callable[..., None], ...]) -> Callable[..., None]:
    if len(handlers) == 1:
        return handlers[0]

    def fan_out(*args: Any) -> None:
        for handler in handlers:
            handler(*args)

    return fan_out
