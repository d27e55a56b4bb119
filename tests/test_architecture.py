"""The layers of the import graph are contracts that `lint-imports` holds, not a convention."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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


def test_an_import_from_the_testbed_into_the_probes_breaks_a_contract(tmp_path: Path) -> None:
    """One import against the layers (the testbed using the tracker) fails the check."""
    tree = copy_of_the_packages(tmp_path)
    with (tree / "testbed" / "topics.py").open("a") as module:
        module.write("\nimport fleetprobe.probes.tracker  # noqa: E402, F401\n")
    result = lint_imports(tree)
    assert result.returncode == 1, result.stdout
    assert "fleetprobe.testbed is not allowed to import fleetprobe.probes" in result.stdout
    assert "fleetprobe.testbed.topics -> fleetprobe.probes.tracker" in result.stdout


def test_an_observer_importing_another_breaks_a_contract(tmp_path: Path) -> None:
    """Hop kinds stay one module each: an observer that imports another fails the check."""
    tree = copy_of_the_packages(tmp_path)
    with (tree / "probes" / "observers" / "webhook.py").open("a") as module:
        module.write("\nimport fleetprobe.probes.observers.mqtt  # noqa: E402, F401\n")
    result = lint_imports(tree)
    assert result.returncode == 1, result.stdout
    assert "Hop kinds are one module each" in result.stdout.split("Broken contracts")[1]


def test_the_shared_words_import_nothing_of_fleetprobe(tmp_path: Path) -> None:
    """core sits at the bottom: importing a layer above it from there fails the check."""
    tree = copy_of_the_packages(tmp_path)
    with (tree / "core" / "times.py").open("a") as module:
        module.write("\nimport fleetprobe.transport.errors  # noqa: E402, F401\n")
    result = lint_imports(tree)
    assert result.returncode == 1, result.stdout
    assert "fleetprobe.core.times -> fleetprobe.transport.errors" in result.stdout
