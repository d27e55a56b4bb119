"""Following signals: the tracker, trace-id extraction and the observers of each hop kind."""

from fleetprobe.probes.chains import ChainSpec, Expectation, HopSpec
from fleetprobe.probes.tracker import Tracker

__all__ = ["ChainSpec", "Expectation", "HopSpec", "Tracker"]
