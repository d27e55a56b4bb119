"""Topic and payload templates: field substitution only, with types kept for lone placeholders."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fleetprobe.simulator.templates import PayloadTemplate, TemplateError, TextTemplate


@pytest.mark.parametrize("value", [42, 1.5, True, False, None, "abc", 0])
def test_lone_placeholder_keeps_the_type(value: Any) -> None:
    """A string that is exactly one placeholder renders to the field's value, type and all."""
    assert TextTemplate("{x}").render({"x": value}) is value


def test_lone_placeholder_render_text_is_a_string() -> None:
    """render_text always gives a string, even for a lone placeholder."""
    assert TextTemplate("{x}").render_text({"x": 42}) == "42"


@pytest.mark.parametrize(
    ("text", "fields", "expected"),
    [
        ("v/{vin}/telemetry", {"vin": "WBA123"}, "v/WBA123/telemetry"),
        ("{a}-{b}", {"a": 1, "b": 2.5}, "1-2.5"),
        ("on={a} off={b}", {"a": True, "b": False}, "on=true off=false"),
        ("[{a}]", {"a": None}, "[]"),
        ("{a}{a}", {"a": "x"}, "xx"),
        (" {a}", {"a": 7}, " 7"),
    ],
)
def test_mixed_text_formats_fields(text: str, fields: dict[str, Any], expected: str) -> None:
    """Placeholders inside longer text are formatted: bools as true/false, None as empty."""
    assert TextTemplate(text).render(fields) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{{x}}", "{x}"),
        ("{{", "{"),
        ("}}", "}"),
        ("a{{b}}c", "a{b}c"),
        ("{{{x}}}", "{7}"),
    ],
)
def test_doubled_braces_are_literal(text: str, expected: str) -> None:
    """``{{`` and ``}}`` render as single literal braces and never start a placeholder."""
    template = TextTemplate(text)
    assert template.render({"x": 7}) == expected
    assert template.fields == ({"x"} if "{{{" in text else set())


def test_text_without_braces_passes_through() -> None:
    """Text without braces renders unchanged and names no fields."""
    template = TextTemplate("plain text: 100%")
    assert template.render({}) == "plain text: 100%"
    assert template.fields == frozenset()


def test_payload_renders_nested_dicts_and_lists() -> None:
    """Every string inside nested mappings and lists is rendered; other scalars pass through."""
    template = PayloadTemplate(
        {
            "vin": "{vin}",
            "meta": {"trace": "{trace_id}", "tags": ["{vin}", "fixed", 3, None, {"s": "{speed}"}]},
            "label": "v={speed} km/h",
            "flag": True,
        }
    )
    fields = {"vin": "WBA1", "trace_id": "ab" * 16, "speed": 51.5}
    assert template.render(fields) == {
        "vin": "WBA1",
        "meta": {"trace": "ab" * 16, "tags": ["WBA1", "fixed", 3, None, {"s": 51.5}]},
        "label": "v=51.5 km/h",
        "flag": True,
    }
    assert template.fields == {"vin", "trace_id", "speed"}


def test_render_bytes_is_compact_json() -> None:
    """render_bytes gives compact UTF-8 JSON (no spaces after separators)."""
    template = PayloadTemplate({"a": "{a}", "b": ["{b}", "x y"], "c": {"d": None}})
    data = template.render_bytes({"a": 1, "b": True})
    assert data == b'{"a":1,"b":[true,"x y"],"c":{"d":null}}'
    assert json.loads(data) == {"a": 1, "b": [True, "x y"], "c": {"d": None}}


def test_unknown_placeholder_is_named_with_the_known_ones() -> None:
    """With ``known`` fields, an unknown placeholder is an error naming it and listing the known."""
    with pytest.raises(TemplateError) as caught:
        TextTemplate("v/{vim}/t", known={"vin", "signal", "profile"})
    message = str(caught.value)
    assert "{vim}" in message
    assert "known: profile, signal, vin" in message


def test_payload_error_says_where() -> None:
    """A payload template error carries the path of the bad string inside the payload."""
    with pytest.raises(TemplateError, match=r"^unknown placeholder \{nope\}") as caught:
        PayloadTemplate({"meta": {"tags": ["{vin}", "{nope}"]}}, known={"vin"})
    assert caught.value.path == ("meta", "tags", 1)


def test_template_error_is_a_value_error() -> None:
    """TemplateError is a ValueError, so validators report it as a value problem."""
    assert issubclass(TemplateError, ValueError)


@pytest.mark.parametrize(
    "text",
    ["{x.__class__}", "{0}", "{a[0]}", "{}", "{ x }", "{x!r}", "{x:>5}", "pre {a.b} post"],
)
def test_non_field_placeholders_are_rejected(text: str) -> None:
    """Attribute, index, positional, empty and format-spec placeholders are errors."""
    with pytest.raises(TemplateError, match="is not a field name"):
        TextTemplate(text)


@pytest.mark.parametrize(
    ("text", "brace"),
    [("{x", "{"), ("x}", "}"), ("a { b", "{"), ("}{", "}"), ("{a{b}", "{")],
)
def test_unbalanced_braces_are_rejected(text: str, brace: str) -> None:
    """A lone brace is an error that names it and suggests doubling it."""
    with pytest.raises(TemplateError) as caught:
        TextTemplate(text)
    message = str(caught.value)
    assert f"unbalanced '{brace}'" in message
    assert f"write '{brace * 2}'" in message
