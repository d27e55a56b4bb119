"""Where a run's reports go: checked before anything starts, so that a run never ends
without its reports, overwrites its own scenario, or replaces a device or a folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from fleetprobe.app.scenario.models import Scenario

Finding = tuple[tuple[str | int, ...], str]
OUTPUTS = ("json", "junit", "traces")
"""The keys of the reports in ``exporters``."""


def check_outputs(scenario: Scenario, scenario_file: Path) -> Iterator[Finding]:
    """Yield ``(path, message)`` for every output file that could not be written as it
    should: the same file as another output or as the scenario, something other than a
    regular file (a directory, a device, a pipe, a symbolic link), or a place where no file
    can be made. Output paths are relative to the working directory."""
    taken = {scenario_file.resolve(): "the scenario file"}
    exporters = scenario.exporters
    trace_log = exporters.trace_log
    paths = (exporters.json_path, exporters.junit, trace_log.path if trace_log else None)
    for key, value in zip(OUTPUTS, paths, strict=True):
        if value is None:
            continue
        where: tuple[str | int, ...] = ("exporters", key)
        if key == "traces" and not isinstance(exporters.traces, str):
            where += ("path",)
        path = Path(value)
        resolved = path.resolve()
        if resolved in taken:
            yield where, f"{value} is {taken[resolved]}: give each report a file of its own"
            continue
        taken[resolved] = f"also exporters.{key}"
        problem = _unwritable(path)
        if problem is not None:
            yield where, f"{value} {problem}"
    if trace_log is not None and trace_log.max_size is not None:
        yield from _check_rotated(Path(trace_log.path), trace_log.keep, taken)


def _check_rotated(path: Path, keep: int, taken: dict[Path, str]) -> Iterator[Finding]:
    """The rotated trace files PATH.1 .. PATH.keep replace what is there: not another
    output, not the scenario, not a folder."""
    where: tuple[str | int, ...] = ("exporters", "traces", "max_size")
    for index in range(1, keep + 1):
        rotated = path.with_name(f"{path.name}.{index}")
        owner = taken.get(rotated.resolve())
        if owner is not None:
            yield where, f"{rotated} (a rotated trace file) is {owner}: name them apart"
        elif rotated.is_dir() or rotated.is_symlink():
            yield where, f"{rotated} (a rotated trace file) is not a regular file"


def _unwritable(path: Path) -> str | None:
    """Why a report cannot be written to ``path`` (replaced through a file beside it and a
    rename), or None."""
    if path.is_symlink():
        return "is a symbolic link: name the file itself (a report replaces its file)"
    if path.exists():
        if path.is_dir():
            return "is a directory: name a file in it"
        if not path.is_file():
            return "is not a regular file (a device, a pipe or a socket): name a file"
    folder = path.parent
    while not folder.exists():  # the report creates missing folders: the first existing one
        folder = folder.parent
    if not folder.is_dir():
        return f"cannot be made: {folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot be written: the folder {folder} is not writable"
    return None
