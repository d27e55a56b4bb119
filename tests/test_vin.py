"""VINs: the ISO 3779 / North American check digit and the generator of valid VINs."""

from __future__ import annotations

import random

import pytest

from fleetprobe.simulator.vin import VIN_ALPHABET, check_digit, is_valid_vin, make_vin


@pytest.mark.parametrize(
    ("vin", "digit"),
    [
        ("1M8GDM9AXKP042788", "X"),  # the NHTSA / ISO 3779 worked example (remainder 10)
        ("11111111111111111", "1"),
        ("1HGCM82633A004352", "3"),
    ],
)
def test_known_vins_are_valid(vin: str, digit: str) -> None:
    """Real VINs with a known check digit validate, and check_digit computes that digit."""
    assert check_digit(vin) == digit
    assert is_valid_vin(vin)


@pytest.mark.parametrize(
    "vin",
    [
        "1M8GDM9A1KP042788",  # wrong check digit
        "1M8GDM9AXKP04278",  # 16 characters
        "1M8GDM9AXKP0427880",  # 18 characters
        "",
        "1M8GDM9AXKP04278I",  # I, O and Q are not VIN characters
        "1M8GDM9AXKP04278O",
        "1M8GDM9AXKP04278Q",
        "1M8GDM9AXKP04278-",
    ],
)
def test_invalid_vins_are_rejected(vin: str) -> None:
    """Wrong check digits, lengths and characters make is_valid_vin False (never raise)."""
    assert not is_valid_vin(vin)


def test_make_vin_is_valid_for_many_seeds() -> None:
    """make_vin gives a valid 17-character VIN without I, O or Q for every seed tried."""
    for seed in range(2_000):
        rng = random.Random(seed)
        vin = make_vin(rng, rng.randrange(1_000_000))
        assert len(vin) == 17
        assert set(vin) <= set(VIN_ALPHABET)
        assert not set(vin) & set("IOQ")
        assert is_valid_vin(vin), vin


def test_make_vin_ends_with_serial_and_serials_keep_vins_unique() -> None:
    """The last six characters are the zero-padded serial, so serials keep VINs unique."""
    rng = random.Random(42)
    vins = [make_vin(rng, serial) for serial in range(1, 5_001)]
    assert [vin[-6:] for vin in vins] == [f"{serial:06d}" for serial in range(1, 5_001)]
    assert len(set(vins)) == len(vins)


def test_make_vin_is_deterministic_for_a_seed() -> None:
    """The same seed and serial give the same VIN."""
    assert make_vin(random.Random(7), 12) == make_vin(random.Random(7), 12)


@pytest.mark.parametrize("serial", [-1, 1_000_000])
def test_make_vin_rejects_serials_beyond_six_digits(serial: int) -> None:
    """A serial outside 0..999999 raises ValueError."""
    with pytest.raises(ValueError, match="six digits"):
        make_vin(random.Random(0), serial)
