"""The scenario: its typed model (format v1) and the loader that validates files into it."""

from fleetprobe.app.scenario.loader import (
    LoadedScenario,
    Problem,
    ScenarioError,
    load_scenario,
    parse_scenario,
)
from fleetprobe.app.scenario.models import Scenario

__all__ = [
    "LoadedScenario",
    "Problem",
    "Scenario",
    "ScenarioError",
    "load_scenario",
    "parse_scenario",
]
