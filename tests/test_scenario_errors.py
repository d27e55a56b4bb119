"""What the scenario loader says about broken scenarios, checked message by message.

Each file in ``tests/scenarios/invalid/`` has one problem; ``expected.yaml`` there holds the
exact output for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleetprobe.app.scenario import ScenarioError, load_scenario

REPO = Path(__file__).resolve().parent.parent
INVALID_DIR = Path("tests/scenarios/invalid")  # relative to REPO, as it appears in messages
EXPECTED_FILE = "expected.yaml"
EXPECTED: dict[str, list[str]] = yaml.safe_load((REPO / INVALID_DIR / EXPECTED_FILE).read_text())
CASES = sorted(p.name for p in (REPO / INVALID_DIR).glob("*.yaml") if p.name != EXPECTED_FILE)

# The variables the broken files refer to; a test environment must not set them.
UNSET_VARIABLES = ("MISSING_VAR", "FLEET_USER")

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
    qos: 1
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


def _case(name: str) -> pytest.ParameterSet:
    return pytest.param(name, id=name.removesuffix(".yaml"))


@pytest.fixture
def at_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from the repository root, without the variables the broken files refer to."""
    monkeypatch.chdir(REPO)
    for name in UNSET_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in UNSET_VARIABLES}
    return subprocess.run(
        [sys.executable, "-m", "fleetprobe", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.usefixtures("at_repo_root")
@pytest.mark.parametrize("name", [_case(name) for name in CASES])
def test_broken_scenario_reports_exact_message(name: str) -> None:
    """Each broken scenario raises ScenarioError whose text is exactly its expected entry."""
    assert name in EXPECTED, f"{name} has no entry in {INVALID_DIR / EXPECTED_FILE}"
    with pytest.raises(ScenarioError) as raised:
        load_scenario(INVALID_DIR / name)
    assert str(raised.value) == "\n".join(EXPECTED[name])


def test_every_expected_entry_has_a_file() -> None:
    """expected.yaml names no file that the folder lacks, and every case names its problem."""
    assert sorted(EXPECTED) == CASES
    assert len(CASES) >= 22
    for name in CASES:
        first_line = (REPO / INVALID_DIR / name).read_text().splitlines()[0]
        assert first_line.startswith("# "), f"{name} must start with a comment saying what is wrong"


def test_validate_cli_reports_bad_files_and_accepts_good_one() -> None:
    """`fleetprobe validate` exits 2, bad files' errors go to stderr, a good file prints ok."""
    bad = [f"{INVALID_DIR}/within_zero.yaml", f"{INVALID_DIR}/qos_3.yaml"]
    result = _cli("validate", *bad, "scenarios/demo.yaml")
    assert result.returncode == 2, result.stderr
    for name in bad:
        for line in EXPECTED[Path(name).name]:
            assert line in result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith("scenarios/demo.yaml: ok"), result.stdout
    assert "within_zero" not in result.stdout and "qos_3" not in result.stdout


def test_secret_value_never_appears_in_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password interpolated from the environment does not leak into the error text."""
    secret = "Zebra-7741-hunter2-s3cr3t"
    monkeypatch.setenv("TEST_SECRET", secret)
    text = _edit(
        MINIMAL,
        "    url: mqtt://127.0.0.1:1\n",
        "    url: mqtt://127.0.0.1:1\n"
        "    username: probe\n"
        "    password: ${TEST_SECRET}\n"
        "    protocol: 4\n",
    )
    text = _edit(text, "    qos: 1\n", "    qos: 3\n")
    path = tmp_path / "secret.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as raised:
        load_scenario(path)
    message = str(raised.value)
    assert [p.message for p in raised.value.problems] == [
        "must be '5' or '3.1.1'",
        "must be 0, 1 or 2",
    ]
    assert secret not in message
    assert not any(secret in repr(problem) for problem in raised.value.problems)


def test_several_problems_reported_in_one_pass_in_line_order(tmp_path: Path) -> None:
    """Problems in three places of one file all come in one ScenarioError, in line order."""
    text = _edit(MINIMAL, "duration: 10s\n", "duration: 5 sec\n")
    text = _edit(text, "        within: 500ms\n", "        within: 0ms\n")
    text = _edit(text, "    qos: 1\n", "    qos: 3\n")
    path = tmp_path / "three.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as raised:
        load_scenario(path)
    assert str(raised.value).splitlines() == [
        f"{path}:2:11: duration: '5 sec' is not a duration: write a number and a unit "
        "(ms, s, m, h), like 250ms or 1.5s",
        f"{path}:16:10: signals > telemetry > qos: must be 0, 1 or 2",
        f"{path}:24:17: chains[0] (telemetry-to-broker) > hops[0] (broker) > within: must be > 0",
    ]
    lines = [problem.line for problem in raised.value.problems]
    assert lines == sorted(lines)


def test_schema_command_prints_json_schema_with_chains() -> None:
    """`fleetprobe schema` prints valid JSON whose properties include chains."""
    result = _cli("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert "chains" in schema["properties"]
