"""Hop kinds, one module each. :func:`hop_kinds` finds them all."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from fleetprobe.probes.observers.base import (
    HopConfig,
    Observer,
    ObserverContext,
    ObserverSetupError,
    WatchedHop,
)


@cache
def hop_kinds() -> dict[str, type[Observer]]:
    """Every hop kind by name, importing each module of this package once."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    return dict(sorted(Observer.registry.items()))


__all__ = [
    "HopConfig",
    "Observer",
    "ObserverContext",
    "ObserverSetupError",
    "WatchedHop",
    "hop_kinds",
]
