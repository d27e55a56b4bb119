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
MAX_DEPTH = 100
_KIND_NAMES = {bool: "a boolean", int: "a number", float: "a number", type(None): "nothing (null)"}
_SHORT_TAGS = {
    f"tag:yaml.org,2002:{name}": f"!!{name}"
    for name in ("int", "float", "bool", "null", "timestamp", "binary", "str")
}


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
        self._open: set[int] = set()  # nodes being built: an alias to one of them is a cycle
        self._built: set[int] = set()  # nodes built once: meeting one again expands an alias
        self._alias_root: Path | None = None  # where the outermost alias expansion began

    def problem(self, path: Path, node: yaml.Node, message: str) -> None:
        self.problems.append(YamlProblem(path, _position(node), message))

    def _problem_above(self, path: Path, message: str) -> None:
        """Report at the nearest mapping key above ``path``: list indexes deep inside an
        expansion or a nesting say nothing to a reader, and an alias has no position."""
        while path and isinstance(path[-1], int):
            path = path[:-1]
        where = self.key_at.get(path) or self.at.get(path) or (1, 1)
        self.problems.append(YamlProblem(path, where, message))

    def build(self, node: yaml.Node, path: Path, depth: int = 0) -> Any:
        self._values += 1
        if self._values > MAX_VALUES:
            if self._values == MAX_VALUES + 1:
                root = self._alias_root if self._alias_root is not None else path
                self._problem_above(
                    root,
                    f"the document expands to more than {MAX_VALUES} values "
                    "(aliases that repeat aliases?)",
                )
            return None
        if depth > MAX_DEPTH:
            if depth == MAX_DEPTH + 1:
                self._problem_above(path, f"values nest more than {MAX_DEPTH} levels deep")
            return None
        if id(node) in self._open:
            self.problem(path, node, "an alias refers to a value that contains it")
            return None
        self.at[path] = _position(node)
        expanding = id(node) in self._built and self._alias_root is None
        if expanding:
            self._alias_root = path
        self._built.add(id(node))
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path, depth)
            if isinstance(node, yaml.SequenceNode):
                if node.tag != _SEQ_TAG:
                    self.problem(path, node, f"tag {node.tag} is not allowed")
                    return None
                return [
                    self.build(item, (*path, i), depth + 1) for i, item in enumerate(node.value)
                ]
            return self._scalar(node, path)
        finally:
            self._open.discard(id(node))
            if expanding:
                self._alias_root = None

    def _mapping(self, node: yaml.MappingNode, path: Path, depth: int) -> Any:
        if node.tag != _MAP_TAG:
            self.problem(path, node, f"tag {node.tag} is not allowed")
            return None
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                self.problem(path, key_node, "merge keys (<<) are not supported; repeat the keys")
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(path, key_node, "a key must be a plain value")
                continue
            key = self._scalar(key_node, path, interpolate=False)
            if not isinstance(key, str):
                # Every key of the format is text; YAML turns on/no/5/~ into other types.
                text = key_node.value
                kind = _KIND_NAMES.get(type(key), f"a {type(key).__name__}")
                self.problem(
                    path, key_node, f"YAML reads the key '{text}' as {kind}; quote it: '{text}'"
                )
                continue
            key_path = (*path, key)
            if key in result:
                line, _ = self.key_at[key_path]
                self.problem(key_path, key_node, f"duplicate key '{key}' (first at line {line})")
                continue
            self.key_at[key_path] = _position(key_node)
            result[key] = self.build(value_node, key_path, depth + 1)
        return result

    def _scalar(self, node: yaml.Node, path: Path, *, interpolate: bool = True) -> Any:
        tag = _SHORT_TAGS.get(node.tag)
        if tag is None and node.tag.startswith("tag:yaml.org,2002:"):
            tag = node.tag
        if tag is None:
            self.problem(path, node, f"tag {node.tag} is not allowed")
            return None
        try:
            value = self._constructor.construct_object(node, deep=True)
        except ConstructorError:
            self.problem(path, node, f"tag {node.tag} is not allowed")
            return None
        except Exception:
            self.problem(path, node, f"cannot read the value as {tag}")
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
