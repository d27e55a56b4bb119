"""Under CI=true a missing tool fails the tests that need it, naming it; locally it skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pytest_without_tools(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    """The promtool tests of test_alert_rules.py, with a PATH where no tool is found."""
    env = {**os.environ, "PATH": str(tmp_path)}
    env.pop("CI", None)
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "-k",
            "promtool",
            str(REPO / "tests" / "test_alert_rules.py"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_missing_promtool_fails_under_ci_naming_it(tmp_path: Path) -> None:
    """CI=true: the run fails and says which tool is missing and which package brings it."""
    result = pytest_without_tools(tmp_path, ci=True)
    assert result.returncode == 1, result.stdout
    assert "promtool is not installed (Debian package prometheus)" in result.stdout
    assert " skipped" not in result.stdout


def test_a_missing_promtool_skips_outside_ci(tmp_path: Path) -> None:
    """Outside CI the same tests are skipped with the reason."""
    result = pytest_without_tools(tmp_path, ci=False)
    assert result.returncode == 0, result.stdout
    assert "skipped" in result.stdout and "failed" not in result.stdout
