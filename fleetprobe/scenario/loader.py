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

from fleetprobe.scenario.checks import cross_check
from fleetprobe.scenario.interpolation import interpolate
from fleetprobe.scenario.models import Scenario
from fleetprobe.scenario.yaml_tree import YamlTree, read_yaml
from transport.errors import FleetprobeError

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
        text = file.read_text(encoding="utf-8")
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
        raise ScenarioError(
            _problem_of(error, tree, filename) for error in exc.errors(include_input=False)
        ) from None
    cross_problems = [
        Problem(filename, *tree.position(path), _breadcrumb(tree, path), message)
        for path, message in cross_check(scenario, base_dir)
    ]
    if cross_problems:
        raise ScenarioError(cross_problems)
    return scenario


def _problem_of(error: ErrorDetails, tree: YamlTree, filename: str) -> Problem:
    path = tuple(error["loc"])
    kind = error["type"]
    message = error["msg"]
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
            *tree.position(path[:-1]),
            _breadcrumb(tree, path[:-1]),
            f"missing required key '{path[-1]}'",
        )
    context = error.get("ctx") or {}
    if kind in _BOUNDS:
        message = f"must be {_BOUNDS[kind]} {context.get(_BOUND_KEYS[kind])}"
    elif kind == "value_error":
        message = message.removeprefix("Value error, ")
    elif kind == "assertion_error":
        message = message.removeprefix("Assertion failed, ")
    elif message.startswith("Input should be"):
        message = "must be" + message.removeprefix("Input should be")
    elif kind == "too_short":
        message = f"needs at least {context.get('min_length')} item(s)"
    return Problem(filename, *tree.position(path), _breadcrumb(tree, path), message)


_BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}
_BOUND_KEYS = {
    "greater_than": "gt",
    "greater_than_equal": "ge",
    "less_than": "lt",
    "less_than_equal": "le",
}


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
