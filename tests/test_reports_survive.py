"""A run never loses its reports to a bad path, an I/O error or a signal, and the exit code
says what happened; a start that fails leaves the previous reports as they were."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, scenario_dict, write_scenario
from fleetprobe.app.scenario import ScenarioError, load_scenario


def outputs_at(tmp_path: Path, **paths: str) -> Path:
    """A valid scenario in ``tmp_path`` whose exporters are ``paths``."""
    scenario = scenario_dict("mqtt://127.0.0.1:1", "p")
    scenario["exporters"] = paths
    return write_scenario(tmp_path / "scenario.yaml", scenario)


def fleetprobe_cli(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m fleetprobe ARGS`` in ``folder``, to its end (bounded)."""
    return subprocess.run(
        [sys.executable, "-m", "fleetprobe", *args],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def problems_of(path: Path) -> str:
    with pytest.raises(ScenarioError) as raised:
        load_scenario(path)
    return str(raised.value)


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        (
            {"json": "out/r.json", "traces": "out/r.json"},
            "exporters > traces: out/r.json is also exporters.json: give each report a file "
            "of its own",
        ),
        (
            {"json": "out/r.xml", "junit": "out/r.xml"},
            "exporters > junit: out/r.xml is also exporters.json",
        ),
        ({"json": "/dev/null"}, "exporters > json: /dev/null is not a regular file"),
        ({"json": "."}, "exporters > json: . is a directory: name a file in it"),
    ],
    ids=["json-is-traces", "junit-is-json", "a-device", "a-directory"],
)
def test_an_output_that_cannot_be_a_report_of_its_own_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, paths: dict[str, str], expected: str
) -> None:
    """Two reports in one file, a device or a folder: refused with the key, before any start."""
    monkeypatch.chdir(tmp_path)
    assert expected in problems_of(outputs_at(tmp_path, **paths))


def test_the_scenario_file_is_never_a_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`traces:` naming the scenario itself would overwrite it: refused, naming the line."""
    monkeypatch.chdir(tmp_path)
    problems = problems_of(outputs_at(tmp_path, traces="scenario.yaml"))
    assert "scenario.yaml:" in problems
    assert "exporters > traces: scenario.yaml is the scenario file" in problems


def test_a_symbolic_link_and_a_file_for_a_folder_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link (to /dev/stdout, say) would be replaced by a file; under a file no file fits."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stdout").symlink_to("/dev/stdout")
    (tmp_path / "plain").write_text("")
    problems = problems_of(outputs_at(tmp_path, json="stdout", junit="plain/junit.xml"))
    assert "exporters > json: stdout is a symbolic link" in problems
    assert "exporters > junit: plain/junit.xml cannot be made: plain is not a folder" in problems


def test_validate_refuses_the_same_paths(tmp_path: Path) -> None:
    """`fleetprobe validate` says the same and exits 2."""
    path = outputs_at(tmp_path, json="r.json", traces="r.json")
    result = fleetprobe_cli(tmp_path, "validate", str(path))
    assert result.returncode == 2
    assert "exporters > traces: r.json is also exporters.json" in result.stdout + result.stderr


def run_cli(
    tmp_path: Path, scenario: dict[str, Any], file_limit: int | None = None
) -> subprocess.Popen[str]:
    """``fleetprobe run`` on ``scenario`` in ``tmp_path``; ``file_limit`` caps the size of
    every file it writes (RLIMIT_FSIZE: a write past it fails with EFBIG, as on a full
    disk, since Python ignores SIGXFSZ)."""
    path = write_scenario(tmp_path / "scenario.yaml", scenario)

    def limit() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.Popen(
        [sys.executable, "-m", "fleetprobe", "run", str(path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
    )


def test_a_trace_log_that_cannot_be_written_does_not_stop_the_run(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """The trace log hits the file size limit mid-run: the run goes on, report.json and
    junit.xml are written, the report names the error, and the exit code is 5."""
    scenario = scenario_dict(broker_url, prefix)
    scenario["exporters"] = {"json": "report.json", "junit": "junit.xml", "traces": "t.jsonl"}
    process = run_cli(tmp_path, scenario, file_limit=16_384)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 5, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["exit_code"] == 5
    assert report["output_errors"] == {"traces": "File too large"}
    assert report["chains"]["telemetry"]["ok"] == report["signals"]["telemetry"]["sent"] > 0
    assert (tmp_path / "junit.xml").read_text().startswith("<?xml")
    assert "trace log t.jsonl: File too large; no more lines are written" in err


def test_a_report_that_cannot_be_written_leaves_no_partial_file(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """report.json over the file size limit: junit.xml is still written, no temporary file
    is left behind, the error is logged and the exit code is 5, not a traceback."""
    scenario = scenario_dict(broker_url, prefix)
    scenario["exporters"] = {"json": "report.json", "junit": "junit.xml"}
    process = run_cli(tmp_path, scenario, file_limit=1_024)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 5, err
    assert "Traceback" not in err
    assert "json (report.json) could not be written: File too large" in err
    assert (tmp_path / "junit.xml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junit.xml", "scenario.yaml"]


async def test_sighup_ends_a_run_like_sigterm_with_its_reports(
    tmp_path: Path, broker_url: str, prefix: str
) -> None:
    """A closed terminal mid-run: exit 129, every report written, the trace log flushed."""
    scenario = scenario_dict(broker_url, prefix, duration="30s")
    scenario["exporters"] = {"json": "report.json", "traces": "t.jsonl"}
    process = run_cli(tmp_path, scenario)
    assert process.stderr is not None
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(30):
        while "emitting for" not in await loop.run_in_executor(None, process.stderr.readline):
            pass
    process.send_signal(signal.SIGHUP)
    _, err = await loop.run_in_executor(None, lambda: process.communicate(timeout=30))
    assert process.returncode == 129, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["interrupted"] is True and report["exit_code"] == 129
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert len(lines) == report["chains"]["telemetry"]["followed"]


def test_a_start_that_fails_leaves_the_previous_reports_alone(tmp_path: Path) -> None:
    """No broker: exit 3, and report.json, junit.xml and the trace log of the last run stay
    as they were (a run that never started has nothing to say over them)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens here once it is closed
    scenario = scenario_dict(f"mqtt://127.0.0.1:{port}", "p")
    scenario["exporters"] = {"json": "report.json", "junit": "junit.xml", "traces": "t.jsonl"}
    previous = {"report.json": '{"last": "run"}', "junit.xml": "<last/>", "t.jsonl": "{}\n"}
    for name, text in previous.items():
        (tmp_path / name).write_text(text)
    process = run_cli(tmp_path, scenario)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 3, err
    assert {name: (tmp_path / name).read_text() for name in previous} == previous
    assert "previous reports, if any, are left as they were" in err


def test_a_device_is_no_scenario(tmp_path: Path) -> None:
    """`validate /dev/zero` stops at the size bound instead of reading forever."""
    result = fleetprobe_cli(tmp_path, "validate", "/dev/zero")
    assert result.returncode == 2
    assert "/dev/zero:1:1: a scenario is at most 1048576 bytes" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "s.yaml", "--workers", "100000"], "is not a number of workers from 1 to 64"),
        (["proxy", "--config", "/missing.json"], "--config /missing.json: [Errno 2]"),
    ],
    ids=["workers-capped", "proxy-config-missing"],
)
def test_bad_arguments_are_usage_errors_not_tracebacks(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    """An absurd --workers or a missing proxy config: exit 2 with the reason, no traceback."""
    result = fleetprobe_cli(tmp_path, *args)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
