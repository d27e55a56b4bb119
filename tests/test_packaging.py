"""The Dockerfile and the README commands stay true to the project."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of every Dockerfile line."""
    lines = (REPO / "Dockerfile").read_text().splitlines()
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_dockerfile_copies_only_paths_that_exist() -> None:
    """Every COPY source in the Dockerfile exists in the repository."""
    copies = [args.split()[:-1] for kind, args in dockerfile_instructions() if kind == "COPY"]
    sources = [source for sources in copies for source in sources]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source


def test_dockerfile_installs_every_package_the_same_way_as_the_readme() -> None:
    """The image copies every package and installs with `pip install .`, as README's command 1."""
    instructions = dockerfile_instructions()
    copied = {args.split()[0] for kind, args in instructions if kind == "COPY"}
    assert {
        "fleetprobe",
        "core",
        "simulator",
        "probes",
        "exporters",
        "faults",
        "transport",
        "testbed",
        "scenarios",
        "pyproject.toml",
    } <= copied
    runs = " ".join(args for kind, args in instructions if kind == "RUN")
    assert re.search(r"pip install (--no-cache-dir )?\.( |$)", runs)
    readme_first_command = next(
        line for line in (REPO / "README.md").read_text().splitlines() if "fleetprobe demo" in line
    )
    assert "pip install . " in readme_first_command
    assert ("USER", "fleetprobe") in instructions
    assert ("ENTRYPOINT", '["fleetprobe"]') in instructions
    assert ("EXPOSE", "9464") in instructions


def test_the_wheel_installs_one_name_with_every_package_and_the_demo_scenario(
    tmp_path: Path,
) -> None:
    """A built wheel adds exactly one top-level name, fleetprobe (and its .dist-info), and
    holds every layer and scenarios/demo.yaml under it, so `fleetprobe demo` works."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
        timeout=180,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("fleetprobe-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    top_level = {name.split("/", 1)[0] for name in names}
    assert top_level == {"fleetprobe", "fleetprobe-0.1.0.dist-info"}
    assert "fleetprobe/scenarios/demo.yaml" in names
    assert "fleetprobe/scenarios/drills/stage-outage.yaml" in names
    for package in (
        "app",
        "app/scenario",
        "core",
        "simulator",
        "probes",
        "probes/observers",
        "exporters",
        "faults",
        "transport",
        "testbed",
    ):
        assert f"fleetprobe/{package}/__init__.py" in names, package
    assert not any("tests/" in name for name in names)


def test_ci_runs_the_readme_test_command() -> None:
    """README's test command is `bash .ci/run`, and .ci/run runs pytest."""
    readme = (REPO / "README.md").read_text()
    assert "bash .ci/run" in readme.split("```")[1]
    assert "pytest" in (REPO / ".ci/run").read_text()
