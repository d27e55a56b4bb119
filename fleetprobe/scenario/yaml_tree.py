"""Read YAML safely into plain values, remembering where each value and key came from.

PyPI's loaders forget positions and silently keep the last of duplicate keys; here the
document is composed into nodes (the C safe loader when present), and values are built
from the nodes with their line and column, rejecting duplicate keys, tags outside the
safe set, merge keys and documents that aliases blow up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

Path = tuple[Any, ...]
Position = tuple[int, int]  # line, column; 1-based

_LOADER: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_VALUES = 200_000


@dataclass
class YamlTree:
    """Plain values with the positions of every value (``at``) and mapping key (``key_at``)."""

    data: Any
    at: dict[Path, Position] = field(default_factory=dict)
    key_at: dict[Path, Position] = field(default_factory=dict)

    def position(self, path: Path, *, key: bool = False) -> Position:
        """The position of ``path`` or of its nearest ancestor that has one."""
        if key and path in self.key_at:
            return self.key_at[path]
        for end in range(len(path), -1, -1):
            if path[:end] in self.at:
                return self.at[path[:end]]
        return (1, 1)


@dataclass(frozen=True)
class YamlProblem:
    """Something wrong at a place in the document."""

    path: Path
    position: Position
    message: str


def read_yaml(
    text: str, on_string: Callable[[str], str] | None = None
) -> tuple[YamlTree, list[YamlProblem]]:
    """Parse ``text``; ``on_string`` transforms each string value (may raise ValueError)."""
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return YamlTree(None), [YamlProblem((), where, f"invalid YAML: {exc.problem or exc}")]
    except yaml.YAMLError as exc:
        return YamlTree(None), [YamlProblem((), (1, 1), f"invalid YAML: {exc}")]
    builder = _Builder(on_string)
    data = builder.build(root, ()) if root is not None else None
    return YamlTree(data, builder.at, builder.key_at), builder.problems


class _Builder:
    def __init__(self, on_string: Callable[[str], str] | None) -> None:
        self.at: dict[Path, Position] = {}
        self.key_at: dict[Path, Position] = {}
        self.problems: list[YamlProblem] = []
        self._on_string = on_string
        self._constructor = SafeConstructor()
        self._values = 0
        self._open: set[int] = set()

    def problem(self, path: Path, node: yaml.Node, message: str) -> None:
        self.problems.append(YamlProblem(path, _position(node), message))

    def build(self, node: yaml.Node, path: Path) -> Any:
        self._values += 1
        if self._values > MAX_VALUES:
            if self._values == MAX_VALUES + 1:
                self.problem(
                    path,
                    node,
                    f"the document expands to more than {MAX_VALUES} values "
                    "(aliases that repeat aliases?)",
                )
            return None
        self.at[path] = _position(node)
        if id(node) in self._open:
            self.problem(path, node, "an alias refers to a value that contains it")
            return None
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                self.problem(path, node, f"tag {node.tag} is not allowed")
                return None
            self._open.add(id(node))
            try:
                return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            finally:
                self._open.discard(id(node))
        return self._scalar(node, path)

    def _mapping(self, node: yaml.MappingNode, path: Path) -> Any:
        if node.tag != _MAP_TAG:
            self.problem(path, node, f"tag {node.tag} is not allowed")
            return None
        result: dict[Any, Any] = {}
        self._open.add(id(node))
        try:
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    self.problem(
                        path, key_node, "merge keys (<<) are not supported; repeat the keys"
                    )
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    self.problem(path, key_node, "a key must be a plain value")
                    continue
                key = self._scalar(key_node, path, interpolate=False)
                if not isinstance(key, str | int | float | bool) and key is not None:
                    self.problem(path, key_node, "a key must be a plain value")
                    continue
                key_path = (*path, key)
                if key in result:
                    line, _ = self.key_at[key_path]
                    self.problem(
                        key_path, key_node, f"duplicate key '{key}' (first at line {line})"
                    )
                    continue
                self.key_at[key_path] = _position(key_node)
                result[key] = self.build(value_node, key_path)
        finally:
            self._open.discard(id(node))
        return result

    def _scalar(self, node: yaml.Node, path: Path, *, interpolate: bool = True) -> Any:
        try:
            value = self._constructor.construct_object(node, deep=True)
        except ConstructorError as exc:
            self.problem(
                path,
                node,
                f"tag {node.tag} is not allowed"
                if "tag" in str(exc)
                else f"cannot read value: {exc.problem}",
            )
            return None
        if interpolate and isinstance(value, str) and self._on_string is not None:
            try:
                value = self._on_string(value)
            except ValueError as exc:
                self.problem(path, node, str(exc))
                return None
        return value


def _position(node: yaml.Node) -> Position:
    return node.start_mark.line + 1, node.start_mark.column + 1
