"""Load a scenario file: safe YAML, ``${ENV}`` interpolation, validation, cross-checks.

Every problem is reported in one pass, each as
``scenario.yaml:14:18: chains[0] (telemetry-to-api) > hops[2] (api) > within: must be > 0``.
Values are never echoed in messages, so a secret cannot leak through an error.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from fleetprobe.app.scenario.checks import cross_check
from fleetprobe.app.scenario.interpolation import interpolate
from fleetprobe.app.scenario.messages import error_message
from fleetprobe.app.scenario.models import Scenario
from fleetprobe.app.scenario.outputs import check_outputs
from fleetprobe.app.scenario.yaml_tree import YamlTree, read_yaml
from fleetprobe.core.errors import FleetprobeError

MAX_SCENARIO_BYTES = 1 << 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a scenario, at a place."""

    file: str
    line: int
    column: int
    where: str  # the breadcrumb, like "chains[0] (telemetry-to-api) > hops[1] (processor) > within"
    message: str

    def __str__(self) -> str:
        place = f"{self.where}: " if self.where else ""
        return f"{self.file}:{self.line}:{self.column}: {place}{self.message}"


class ScenarioError(FleetprobeError):
    """A scenario that cannot run; ``problems`` lists every reason, in file order."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.column))
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class LoadedScenario:
    """A valid scenario and the folder its relative input files are read from."""

    scenario: Scenario
    base_dir: Path


def load_scenario(path: str | Path, environ: Mapping[str, str] | None = None) -> LoadedScenario:
    """Read and validate the scenario at ``path``.

    Raises:
        ScenarioError: the file is unreadable or invalid; nothing may start.
    """
    file = Path(path)
    try:
        size = file.stat().st_size
        if size > MAX_SCENARIO_BYTES:
            raise ScenarioError(
                [
                    Problem(
                        str(path),
                        1,
                        1,
                        "",
                        f"file is {size} bytes; a scenario is at most {MAX_SCENARIO_BYTES}",
                    )
                ]
            )
        with file.open("rb") as stream:  # bounded: a device such as /dev/zero has no size
            data = stream.read(MAX_SCENARIO_BYTES + 1)
        if len(data) > MAX_SCENARIO_BYTES:
            raise ScenarioError(
                [Problem(str(path), 1, 1, "", f"a scenario is at most {MAX_SCENARIO_BYTES} bytes")]
            )
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError([Problem(str(path), 1, 1, "", f"cannot read: {exc}")]) from None
    scenario = parse_scenario(text, str(path), environ, base_dir=file.parent)
    return LoadedScenario(scenario, file.parent)


def parse_scenario(
    text: str,
    filename: str = "<scenario>",
    environ: Mapping[str, str] | None = None,
    *,
    base_dir: Path | None = None,
) -> Scenario:
    """Validate scenario text; ``base_dir`` is where relative input files are looked up."""
    env = os.environ if environ is None else environ
    tree, yaml_problems = read_yaml(text, lambda s: interpolate(s, env) if "$" in s else s)
    problems = [
        Problem(filename, *p.position, _breadcrumb(tree, p.path), p.message) for p in yaml_problems
    ]
    if problems:
        raise ScenarioError(problems)
    if not isinstance(tree.data, dict):
        raise ScenarioError(
            [
                Problem(
                    filename,
                    1,
                    1,
                    "",
                    "a scenario is a mapping of keys "
                    "(name, duration, target, fleet, signals, chains, ...)",
                )
            ]
        )
    try:
        scenario = Scenario.model_validate(tree.data)
    except ValidationError as exc:
        errors = _merge_alternatives(exc.errors(include_input=False))
        raise ScenarioError(_problem_of(error, tree, filename) for error in errors) from None
    cross_problems = [
        Problem(filename, *_place(tree, path), _breadcrumb(tree, path), message)
        for path, message in cross_check(scenario, base_dir)
    ]
    if base_dir is not None:  # a scenario from a file: its outputs must be writable there
        cross_problems += [
            Problem(filename, *_place(tree, path), _breadcrumb(tree, path), message)
            for path, message in check_outputs(scenario, Path(filename))
        ]
    if cross_problems:
        raise ScenarioError(cross_problems)
    return scenario


def _problem_of(error: ErrorDetails, tree: YamlTree, filename: str) -> Problem:
    path = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return Problem(
            filename,
            *tree.position(path, key=True),
            _breadcrumb(tree, path[:-1]),
            _unknown_key(path),
        )
    if kind == "missing":
        return Problem(
            filename,
            *_place(tree, path[:-1]),
            _breadcrumb(tree, path[:-1]),
            f"missing required key '{path[-1]}'",
        )
    if path and path[-1] == "[key]":  # pydantic's mark for a mapping's key, not its value
        path = path[:-1]
        return Problem(
            filename,
            *tree.position(path, key=True),
            _breadcrumb(tree, path),
            "this name " + error_message(error),
        )
    # Errors of ours that know where inside the value they are (a template in a payload).
    path += tuple(getattr((error.get("ctx") or {}).get("error"), "path", ()))
    return Problem(filename, *_place(tree, path), _breadcrumb(tree, path), error_message(error))


def _place(tree: YamlTree, path: tuple[Any, ...]) -> tuple[int, int]:
    """Where to point for ``path``: at the key of a block that starts on the next line (the
    block itself starts at its first entry), anything else at its value."""
    value_at = tree.position(path)
    key_at = tree.key_at.get(path)
    return key_at if key_at is not None and key_at[0] < value_at[0] else value_at


_UNION_MEMBERS = {
    "str": "a string",
    "int": "a number",
    "float": "a number",
    "bool": "a boolean",
    "none": "null",
}


def _merge_alternatives(errors: list[ErrorDetails]) -> list[ErrorDetails]:
    """One error for a value that matched none of a union's members, not one per member."""
    merged: list[ErrorDetails] = []
    by_path: dict[tuple[Any, ...], ErrorDetails] = {}
    for error in errors:
        loc = tuple(error["loc"])
        member = str(loc[-1]) if loc else ""
        if member not in _UNION_MEMBERS or not error["type"].endswith(("_type", "none_required")):
            merged.append(error)
            continue
        parent = loc[:-1]
        if parent not in by_path:
            by_path[parent] = ErrorDetails(
                type="alternatives", loc=parent, msg="", input=None, ctx={"members": []}
            )
            merged.append(by_path[parent])
        members = by_path[parent]["ctx"]["members"]
        if _UNION_MEMBERS[member] not in members:
            members.append(_UNION_MEMBERS[member])
    for error in by_path.values():
        members = error["ctx"]["members"]
        error["ctx"]["choices"] = (
            members[0] if len(members) == 1 else ", ".join(members[:-1]) + " or " + members[-1]
        )
    return merged


def _breadcrumb(tree: YamlTree, path: tuple[Any, ...]) -> str:
    """``chains[0] (telemetry-to-api) > hops[2] (api) > within`` for a path."""
    parts: list[str] = []
    node = tree.data
    for step in path:
        if isinstance(step, int) and parts:
            parts[-1] += f"[{step}]"
        else:
            parts.append(str(step))
        node = node[step] if _has(node, step) else None
        if isinstance(step, int) and isinstance(node, dict) and isinstance(node.get("name"), str):
            parts[-1] += f" ({node['name']})"
    return " > ".join(parts)


def _has(node: Any, step: Any) -> bool:
    if isinstance(node, dict):
        return step in node
    return isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)


def _unknown_key(path: tuple[Any, ...]) -> str:
    key = str(path[-1])
    allowed = _allowed_keys(path[:-1])
    if not allowed:
        return f"unknown key '{key}'"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"expected one of: {', '.join(allowed)}"
    return f"unknown key '{key}' ({hint})"


def _allowed_keys(path: tuple[Any, ...]) -> list[str]:
    """The keys the model at ``path`` accepts, found by walking the model's annotations."""
    annotation: Any = Scenario
    for step in path:
        model = _model_in(annotation)
        if model is not None and isinstance(step, str):
            field = next((f for n, f in model.model_fields.items() if (f.alias or n) == step), None)
            if field is None:
                return []
            annotation = field.annotation
        else:
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[-1] if args else None
    model = _model_in(annotation)
    return [f.alias or n for n, f in model.model_fields.items()] if model else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
