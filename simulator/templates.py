"""Templates for topics and JSON payloads, filled by field substitution only.

A placeholder ``{name}`` names a field of the signal. A string that is exactly one
placeholder takes the field's value with its type (a number stays a number); placeholders
inside a longer string are formatted into it; ``{{`` and ``}}`` are literal braces;
everything else passes through unchanged. There is no expression, attribute or index
syntax, so a template can never reach into Python objects (``{x.__class__}`` is an error).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

from fleetprobe.core.errors import FleetprobeError

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

Fields = Mapping[str, Any]


class TemplateError(FleetprobeError, ValueError):
    """A template that cannot be compiled; the message says which placeholder and why.

    Attributes:
        path: where in a JSON template the bad string is (keys and list indexes).
    """

    def __init__(self, message: str, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.path = path


class TextTemplate:
    """A compiled string template."""

    __slots__ = ("_parts", "_single", "fields", "text")

    def __init__(self, text: str, known: Collection[str] | None = None) -> None:
        self.text = text
        parts: list[str | tuple[str]] = []
        position = 0
        for match in _TOKEN.finditer(text):
            parts.append(text[position : match.start()])
            token = match.group(0)
            if token in ("{{", "}}"):
                parts.append(token[0])
            elif match.group(1) is None:
                # The text is not echoed: it may hold an interpolated secret.
                raise TemplateError(f"unbalanced '{token}' (write '{token * 2}' for a literal one)")
            else:
                parts.append((_check_name(match.group(1), known),))
            position = match.end()
        parts.append(text[position:])
        merged = [p for p in parts if p != ""]
        self._parts: tuple[str | tuple[str], ...] = tuple(merged)
        self._single = merged[0][0] if len(merged) == 1 and isinstance(merged[0], tuple) else None
        self.fields = frozenset(p[0] for p in merged if isinstance(p, tuple))

    def render(self, fields: Fields) -> Any:
        """The text with fields substituted; a lone placeholder keeps the value's type."""
        if self._single is not None:
            return fields[self._single]
        return "".join(p if isinstance(p, str) else _as_text(fields[p[0]]) for p in self._parts)

    def render_text(self, fields: Fields) -> str:
        """Like :meth:`render`, but always a string (for topics and URLs)."""
        return "".join(p if isinstance(p, str) else _as_text(fields[p[0]]) for p in self._parts)


class PayloadTemplate:
    """A compiled JSON template: mappings, lists and scalars with string templates inside."""

    def __init__(self, template: Any, known: Collection[str] | None = None) -> None:
        self.fields: frozenset[str] = frozenset()
        self._render = self._compile(template, known, ())

    def render(self, fields: Fields) -> Any:
        """The JSON value with every placeholder filled."""
        return self._render(fields)

    def render_bytes(self, fields: Fields) -> bytes:
        """The rendered value as compact UTF-8 JSON."""
        return json.dumps(self._render(fields), separators=(",", ":")).encode()

    def _compile(
        self, node: Any, known: Collection[str] | None, where: tuple[str | int, ...]
    ) -> Callable[[Fields], Any]:
        if isinstance(node, str):
            if "{" not in node and "}" not in node:
                return lambda _fields: node
            try:
                text = TextTemplate(node, known)
            except TemplateError as exc:
                raise TemplateError(str(exc), where) from None
            self.fields |= text.fields
            return text.render
        if isinstance(node, Mapping):
            items = [(str(k), self._compile(v, known, (*where, str(k)))) for k, v in node.items()]
            return lambda fields: {k: render(fields) for k, render in items}
        if isinstance(node, list):
            renders = [self._compile(v, known, (*where, i)) for i, v in enumerate(node)]
            return lambda fields: [render(fields) for render in renders]
        return lambda _fields: node


def _check_name(name: str, known: Collection[str] | None) -> str:
    if not _FIELD_NAME.match(name):
        raise TemplateError(
            f"{{{name}}} is not a field name: placeholders name fields, never attributes,"
            " indexes or expressions"
        )
    if known is not None and name not in known:
        raise TemplateError(f"unknown placeholder {{{name}}}; known: {', '.join(sorted(known))}")
    return name


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
