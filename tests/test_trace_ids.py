"""Trace-id extraction (JSON paths, normalization, bodies, headers) and config parsing."""

from __future__ import annotations

from typing import Any

import pytest

from fleetprobe.core.durations import parse_duration
from fleetprobe.probes.json_paths import compile_path
from fleetprobe.probes.trace_ids import (
    BAD_TRACE_ID,
    MISSING,
    NO_TRACE_ID,
    NOT_JSON,
    Unmatched,
    from_body,
    from_pairs,
    lookup,
    normalize_trace_id,
    parse_json,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


# --- compile_path ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        ("$", ()),
        ("$.a", ("a",)),
        ("$.a.b[0]", ("a", "b", 0)),
        ("$.items[12].id", ("items", 12, "id")),
        ('$["x-y"]', ("x-y",)),
        ("$['k']", ("k",)),
        ("$['with space'].x", ("with space", "x")),
        ('$.meta["trace.id"]', ("meta", "trace.id")),
        ("$.trace-id", ("trace-id",)),
        ("$._x1", ("_x1",)),
        ('$[""]', ("",)),
    ],
)
def test_compile_path(text: str, steps: tuple[str | int, ...]) -> None:
    """Dotted names, [index], ["key"] and ['key'] compile to their steps in order."""
    assert compile_path(text) == steps


@pytest.mark.parametrize(
    "text", ["a.b", "", ".a", "$.", "$..a", "$.1a", "$[x]", "$[-1]", "$.a[", '$["a]', "$ .a"]
)
def test_compile_path_rejects_bad_paths(text: str) -> None:
    """Anything but $ followed by .name, [index] or ["key"] steps is a ValueError."""
    with pytest.raises(ValueError, match="is not a path"):
        compile_path(text)


# --- parse_duration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("2h", 7200.0),
        (".5s", 0.5),
        ("3.s", 3.0),
        (" 10s ", 10.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """A number and a unit (ms, s, m, h) give seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5", "s", "-1s", "1 s", "1e3s", "1d", "1.5.s", ""])
def test_parse_duration_rejects_bad_text(text: str) -> None:
    """Missing or unknown units, signs and exponents are ValueErrors with an example."""
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


# --- lookup ------------------------------------------------------------------------------


def test_lookup_finds_nested_values() -> None:
    """lookup follows names and indexes through dicts and lists."""
    body = {"a": {"b": [{"c": 1}, None]}}
    assert lookup(body, ("a", "b", 0, "c")) == 1
    assert lookup(body, ("a", "b", 1)) is None
    assert lookup(body, ()) is body


@pytest.mark.parametrize(
    "steps",
    [("x",), ("a", "x"), ("a", "b", 2), ("a", 0), ("a", "b", "0"), ("a", "b", 0, "c", "d")],
)
def test_lookup_missing(steps: tuple[str | int, ...]) -> None:
    """Absent keys, out-of-range indexes and steps of the wrong kind give MISSING."""
    assert lookup({"a": {"b": [{"c": 1}]}}, steps) is MISSING


# --- normalize_trace_id ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (TRACE, TRACE),
        (TRACE.upper(), TRACE),
        (f" {TRACE}\n", TRACE),
        (f"00-{TRACE}-{SPAN}-01", TRACE),
        (f"00-{TRACE.upper()}-{SPAN.upper()}-01", TRACE),
        (bytes.fromhex(TRACE), TRACE),
        (bytearray.fromhex(TRACE), TRACE),
    ],
)
def test_normalize_accepts_trace_id_forms(value: Any, expected: str) -> None:
    """32 hex (any case), traceparent and 16 bytes all give the lowercase 32-hex trace id."""
    assert normalize_trace_id(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        TRACE[:-1],
        TRACE + "0",
        TRACE[:-1] + "g",
        "0" * 32,
        f"00-{TRACE}-{SPAN}",
        f"00-{TRACE}-{SPAN[:-1]}-01",
        bytes.fromhex(TRACE)[:15],
        bytes.fromhex(TRACE) + b"\x00",
        TRACE.encode(),  # 32 bytes of ASCII hex: not 16 bytes of correlation data
        "",
        None,
        123,
        1.5,
        True,
        [TRACE],
        {"id": TRACE},
    ],
)
def test_normalize_rejects_wrong_shapes(value: Any) -> None:
    """Wrong lengths, non-hex, the all-zero id and non-string values give None."""
    assert normalize_trace_id(value) is None


@pytest.mark.parametrize("value", [f"00-{'0' * 32}-{SPAN}-01", bytes(16)])
def test_normalize_rejects_all_zero_id_in_every_form(value: Any) -> None:
    """The all-zero trace id is invalid in traceparent form and as bytes too."""
    assert normalize_trace_id(value) is None


# --- from_body / from_pairs ----------------------------------------------------------------


def test_from_body_reads_the_id_at_the_path() -> None:
    """from_body returns the normalized id found at the path."""
    body = parse_json(b'{"meta": {"trace_id": "%s"}}' % TRACE.upper().encode())
    assert from_body(body, ("meta", "trace_id")) == TRACE


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", NOT_JSON),
        (b"\xff\xfe", NOT_JSON),
        (b'{"meta": {"trace_id": "', NOT_JSON),
        (b"{}", NO_TRACE_ID),
        (b'{"meta": {}}', NO_TRACE_ID),
        (b'{"meta": {"trace_id": null}}', NO_TRACE_ID),
        (b'{"meta": []}', NO_TRACE_ID),
        (b"[1, 2]", NO_TRACE_ID),
        (b'{"meta": {"trace_id": "abc"}}', BAD_TRACE_ID),
        (b'{"meta": {"trace_id": 42}}', BAD_TRACE_ID),
        (b'{"meta": {"trace_id": {"id": "x"}}}', BAD_TRACE_ID),
    ],
)
def test_from_body_unmatched_reasons(payload: bytes, reason: str) -> None:
    """Non-JSON, absent and wrongly shaped ids raise Unmatched with the right reason."""
    with pytest.raises(Unmatched) as caught:
        from_body(parse_json(payload), ("meta", "trace_id"))
    assert caught.value.reason == reason


def test_parse_json_gives_missing_for_non_json() -> None:
    """parse_json returns MISSING for bytes that are not UTF-8 JSON, never raises."""
    assert parse_json(b"{") is MISSING
    assert parse_json(b"\xc3\x28") is MISSING
    assert parse_json(b"[" * 100_000) is MISSING
    assert parse_json(b"null") is None


def test_from_pairs_is_case_insensitive_and_takes_the_first() -> None:
    """from_pairs matches the name in any case and uses the first matching pair."""
    pairs = [("Content-Type", "x"), ("TraceParent", f"00-{TRACE}-{SPAN}-01"), ("traceparent", "z")]
    assert from_pairs(pairs, "traceparent") == TRACE
    assert from_pairs([("x-trace-id", TRACE)], "X-Trace-ID") == TRACE


@pytest.mark.parametrize(
    ("pairs", "reason"),
    [([], NO_TRACE_ID), ([("other", TRACE)], NO_TRACE_ID), ([("trace-id", "nope")], BAD_TRACE_ID)],
)
def test_from_pairs_unmatched_reasons(pairs: list[tuple[str, str]], reason: str) -> None:
    """A missing name is no_trace_id; a value of the wrong shape is bad_trace_id."""
    with pytest.raises(Unmatched) as caught:
        from_pairs(pairs, "trace-id")
    assert caught.value.reason == reason
