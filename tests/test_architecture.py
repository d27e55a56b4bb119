"""The layers of the import graph are contracts that `lint-imports` holds, not a convention."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("core", "simulator", "probes", "exporters", "faults", "transport", "testbed", "scenarios")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """Run lint-imports on the fleetprobe package found in ``tree``."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def copy_of_the_packages(tmp_path: Path) -> Path:
    """The packages and pyproject.toml, copied with their links, to break one on purpose."""
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copy(REPO / "pyproject.toml", tree)
    for name in ("fleetprobe", *LAYERS):
        shutil.copytree(
            REPO / name,
            tree / name,
            symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    return tree


def test_the_import_contracts_hold() -> None:
    """Every contract in pyproject.toml is kept by the code as it is."""
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "imported", "expected"),
    [
        (
            "testbed/topics.py",
            "fleetprobe.probes.tracker",
            "fleetprobe.testbed.topics -> fleetprobe.probes.tracker",
        ),
        (
            "probes/observers/webhook.py",
            "fleetprobe.probes.observers.mqtt",
            "Hop kinds are one module each",
        ),
        (
            "core/times.py",
            "fleetprobe.transport.errors",
            "fleetprobe.core.times -> fleetprobe.transport.errors",
        ),
    ],
    ids=["testbed-into-probes", "observer-into-observer", "core-into-transport"],
)
def test_one_import_against_the_layers_breaks_a_contract(
    tmp_path: Path, module: str, imported: str, expected: str
) -> None:
    """The testbed using the tracker, an observer using another, the shared words using a
    layer above them: each one import fails the check, naming what broke."""
    tree = copy_of_the_packages(tmp_path)
    with (tree / module).open("a") as source:
        source.write(f"\nimport {imported}  # noqa: E402, F401\n")
    result = lint_imports(tree)
    assert result.returncode == 1, result.stdout
    assert expected in result.stdout.split("Broken contracts")[1]
