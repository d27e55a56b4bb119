"""Vehicle identification numbers (ISO 3779, with the North American check digit)."""

from __future__ import annotations

import random

VIN_ALPHABET = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"  # no I, O, Q
_VALUES = {
    **{str(d): d for d in range(10)},
    **dict(zip("ABCDEFGH", range(1, 9), strict=True)),
    **dict(zip("JKLMN", range(1, 6), strict=True)),
    "P": 7,
    "R": 9,
    **dict(zip("STUVWXYZ", range(2, 10), strict=True)),
}
_WEIGHTS = (8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2)
# World manufacturer identifiers of real makers, so the VINs look familiar in dashboards.
_WMIS = ("WDD", "WBA", "WVW", "WAU", "WP0", "VF1", "ZFA", "YV1", "SAJ", "JHM", "1FA", "5YJ")
_MODEL_YEARS = "RSTVWXY123456789"  # the tenth character: 2024 is R, 2025 S, ...


def check_digit(vin: str) -> str:
    """The ninth character that makes ``vin`` valid ('0'-'9' or 'X')."""
    total = sum(_VALUES[c] * w for c, w in zip(vin, _WEIGHTS, strict=True))
    remainder = total % 11
    return "X" if remainder == 10 else str(remainder)


def is_valid_vin(vin: str) -> bool:
    """True when ``vin`` has 17 allowed characters and a correct check digit."""
    return len(vin) == 17 and all(c in _VALUES for c in vin) and vin[8] == check_digit(vin)


def make_vin(rng: random.Random, serial: int) -> str:
    """A valid VIN whose last six characters are ``serial`` (so serials keep VINs unique)."""
    if not 0 <= serial < 1_000_000:
        raise ValueError("serial must have at most six digits")
    wmi = rng.choice(_WMIS)
    vds = "".join(rng.choice(VIN_ALPHABET) for _ in range(5))
    year = rng.choice(_MODEL_YEARS)
    plant = rng.choice(VIN_ALPHABET)
    draft = f"{wmi}{vds}0{year}{plant}{serial:06d}"
    return draft[:8] + check_digit(draft) + draft[9:]
