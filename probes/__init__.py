"""Following signals: the tracker, trace-id extraction and the observers of each hop kind."""

from fleetprobe.probes.chains import (
    ChainSpec,
    Expectation,
    FollowedSignal,
    HopResult,
    HopSpec,
    Verdict,
)
from fleetprobe.probes.tracker import Tracker, TrackerListener

__all__ = [
    "ChainSpec",
    "Expectation",
    "FollowedSignal",
    "HopResult",
    "HopSpec",
    "Tracker",
    "TrackerListener",
    "Verdict",
]
