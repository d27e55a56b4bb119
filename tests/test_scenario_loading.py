"""Valid scenarios load: shipped files, ``${ENV}`` interpolation, durations and jitter."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetprobe.app.scenario import LoadedScenario, load_scenario, parse_scenario
from fleetprobe.app.scenario.interpolation import interpolate
from fleetprobe.app.scenario.models import CadenceConfig
from fleetprobe.core.durations import parse_duration

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "scenarios").glob("*.yaml"))

MINIMAL = """\
name: probe
duration: 10s
target:
  mqtt:
    url: mqtt://127.0.0.1:1
fleet:
  vehicles: 1
  area: {lat: 48.78, lon: 9.18, radius_km: 5}
  profiles:
    - name: car
      signals:
        telemetry: {every: 1s}
signals:
  telemetry:
    topic: vehicles/{vin}/telemetry
    payload: {vin: "{vin}", trace_id: "{trace_id}"}
chains:
  - name: telemetry-to-broker
    signal: telemetry
    hops:
      - name: broker
        mqtt: {topic: vehicles/+/telemetry}
        within: 500ms
"""


def _edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def _with_mqtt_keys(keys: str) -> str:
    return _edit(MINIMAL, "    url: mqtt://127.0.0.1:1\n", keys)


def test_there_are_shipped_scenarios() -> None:
    """The package ships at least one scenario (demo.yaml)."""
    assert REPO / "scenarios" / "demo.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_scenario_validates(path: Path) -> None:
    """Every shipped scenario loads with its defaults, from its own folder."""
    loaded = load_scenario(path, environ={})
    assert isinstance(loaded, LoadedScenario)
    assert loaded.base_dir == path.parent
    assert loaded.scenario.chains


def test_interpolation_fills_variables_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """${VAR} takes the variable, ${VAR:-default} the default when unset, $${ stays literal."""
    monkeypatch.setenv("FP_TEST_URL", "mqtt://broker.example:1884")
    monkeypatch.setenv("FP_TEST_USER", "alice")
    monkeypatch.setenv("FP_TEST_SUFFIX", "eu")
    monkeypatch.delenv("FP_TEST_UNSET", raising=False)
    text = _with_mqtt_keys(
        "    url: ${FP_TEST_URL:-mqtt://127.0.0.1:1}\n"
        "    username: ${FP_TEST_USER}\n"
        "    password: ${FP_TEST_UNSET:-fallback}\n"
    )
    text = _edit(text, "name: probe\n", "name: probe-${FP_TEST_SUFFIX}-${FP_TEST_UNSET:-}x\n")
    text += 'exporters: {json: "out/$${RUN}.json"}\n'
    scenario = parse_scenario(text)
    mqtt = scenario.target.mqtt
    assert mqtt.url == "mqtt://broker.example:1884"
    assert mqtt.username == "alice"
    assert mqtt.password is not None
    assert mqtt.password.get_secret_value() == "fallback"
    assert scenario.name == "probe-eu-x"
    assert scenario.exporters.json_path == "out/${RUN}.json"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${A}", "1"),
        ("x-${A}-${B:-two}-y", "x-1-two-y"),
        ("${UNSET:-}", ""),
        ("${A:-ignored}", "1"),
        ("$${A}", "${A}"),
        ("$${A}-${A}", "${A}-1"),
        ("no references $ here", "no references $ here"),
    ],
)
def test_interpolate_text(text: str, expected: str) -> None:
    """interpolate() replaces references, uses defaults and unescapes $${."""
    assert interpolate(text, {"A": "1"}) == expected


@pytest.mark.parametrize("value", ["a: b", "[1, 2]", "{x: 1}", "- item", "&a *a", "null"])
def test_interpolation_never_changes_structure(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A variable's value stays one string even when it looks like YAML."""
    monkeypatch.setenv("FP_TEST_STRUCT", value)
    scenario = parse_scenario(
        _with_mqtt_keys("    url: mqtt://127.0.0.1:1\n    username: ${FP_TEST_STRUCT}\n")
    )
    assert scenario.target.mqtt.username == value


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("0.5s", 0.5),
        (".5s", 0.5),
        ("10s", 10.0),
    ],
)
def test_duration_parses(text: str, seconds: float) -> None:
    """Durations are a number and a unit (ms, s, m, h), in seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


def test_durations_in_a_scenario_are_seconds() -> None:
    """Scenario durations are validated into seconds."""
    text = _edit(MINIMAL, "duration: 10s\n", "duration: 5m\n")
    text = _edit(text, "        within: 500ms\n", "        within: 250ms\n")
    scenario = parse_scenario(text)
    assert scenario.duration == pytest.approx(300.0)
    assert scenario.chains[0].hops[0].within == pytest.approx(0.25)
    assert scenario.fleet.profiles[0].signals["telemetry"].every == pytest.approx(1.0)


@pytest.mark.parametrize(("jitter", "seconds"), [("10%", 0.1), ("50ms", 0.05), ("0s", 0.0)])
def test_jitter_of_every_second(jitter: str, seconds: float) -> None:
    """Jitter is a share of `every` (10% of 1s is 0.1s) or a duration (50ms is 0.05s)."""
    cadence = CadenceConfig.model_validate({"every": "1s", "jitter": jitter})
    assert cadence.jitter_s == pytest.approx(seconds)


def test_jitter_in_a_scenario() -> None:
    """A profile's signal cadence carries its jitter in seconds."""
    text = _edit(MINIMAL, "{every: 1s}", "{every: 1s, jitter: 10%}")
    cadence = parse_scenario(text).fleet.profiles[0].signals["telemetry"]
    assert cadence.every == pytest.approx(1.0)
    assert cadence.jitter_s == pytest.approx(0.1)
