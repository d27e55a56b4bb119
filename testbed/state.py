"""The processor's view of the fleet: the latest state of each vehicle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleetprobe.testbed.events import sent_at_of, signal_of, trace_id_of, utc_now_iso


@dataclass(frozen=True, slots=True)
class VehicleState:
    """The latest event of one vehicle, as the state API serves it.

    Attributes:
        arrival: the event's arrival order at the processor (higher is later).
        sent_at: the event's ``sent_at`` in POSIX seconds, when it had one.
    """

    vin: str
    trace_id: str | None
    signal: str | None
    updated_at: str
    event: dict[str, Any]
    arrival: int
    sent_at: float | None

    def as_json(self) -> dict[str, Any]:
        """The state API's body for this vehicle."""
        return {
            "vin": self.vin,
            "last_trace_id": self.trace_id,
            "last_signal": self.signal,
            "updated_at": self.updated_at,
            "state": self.event,
        }


class StateStore:
    """The latest event per VIN; an older event never replaces a newer one.

    "Newer" compares ``sent_at`` when both events have one (delay jitter reorders events
    inside the platform, not at the vehicle), and the processor's arrival order otherwise.
    """

    def __init__(self) -> None:
        self._states: dict[str, VehicleState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def get(self, vin: str) -> VehicleState | None:
        """The vehicle's latest state, or None for a vehicle never seen."""
        return self._states.get(vin)

    def update(self, vin: str, event: dict[str, Any], arrival: int) -> bool:
        """Store ``event`` as the vehicle's state if it is newer; True when stored.

        Args:
            vin: the vehicle.
            event: the enriched event.
            arrival: the event's arrival order at the processor.
        """
        candidate = VehicleState(
            vin=vin,
            trace_id=trace_id_of(event),
            signal=signal_of(event),
            updated_at=utc_now_iso(),
            event=event,
            arrival=arrival,
            sent_at=sent_at_of(event),
        )
        current = self._states.get(vin)
        if current is not None and not _newer(candidate, current):
            return False
        self._states[vin] = candidate
        return True


def _newer(candidate: VehicleState, current: VehicleState) -> bool:
    if candidate.sent_at is not None and current.sent_at is not None:
        return (candidate.sent_at, candidate.arrival) > (current.sent_at, current.arrival)
    return candidate.arrival > current.arrival
