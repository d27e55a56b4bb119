"""Small-area geometry on a sphere, enough for vehicles moving within tens of kilometres."""

from __future__ import annotations

import math
import random

EARTH_RADIUS_KM = 6371.0088


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(a))


def bearing_deg(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Initial heading from the first point to the second, 0-360 degrees clockwise from north."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dl = math.radians(lon2 - lon1)
    x = math.sin(dl) * math.cos(p2)
    y = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return math.degrees(math.atan2(x, y)) % 360.0


def random_point(
    rng: random.Random, lat: float, lon: float, radius_km: float
) -> tuple[float, float]:
    """A point uniformly distributed over the disc of ``radius_km`` around (lat, lon)."""
    r = radius_km * math.sqrt(rng.random())
    theta = rng.uniform(0.0, 2 * math.pi)
    dlat = (r * math.cos(theta)) / EARTH_RADIUS_KM
    dlon = (r * math.sin(theta)) / (EARTH_RADIUS_KM * math.cos(math.radians(lat)))
    return lat + math.degrees(dlat), lon + math.degrees(dlon)
