"""Hop kinds, one module each. :func:`hop_kinds` finds them all.

A hop kind from another distribution registers its module under the entry-point group
``fleetprobe.hop_kinds``; loading the module registers its :class:`Observer` subclass.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from importlib.metadata import entry_points

from fleetprobe.probes.observers.base import (
    HopConfig,
    Observer,
    ObserverContext,
    ObserverSetupError,
    WatchedHop,
)

ENTRY_POINT_GROUP = "fleetprobe.hop_kinds"


@cache
def hop_kinds() -> dict[str, type[Observer]]:
    """Every hop kind by name: this package's modules and the installed plugins', each
    imported once."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    for plugin in entry_points(group=ENTRY_POINT_GROUP):
        plugin.load()
    return dict(sorted(Observer.registry.items()))


__all__ = [
    "HopConfig",
    "Observer",
    "ObserverContext",
    "ObserverSetupError",
    "WatchedHop",
    "hop_kinds",
]
