"""Pydantic's validation messages, in the words of the scenario format."""

from __future__ import annotations

from pydantic_core import ErrorDetails

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def error_message(error: ErrorDetails) -> str:
    """Pydantic's message for ``error``, in the words of the scenario format."""
    kind, message = error["type"], error["msg"]
    context = error.get("ctx") or {}
    if kind == "alternatives":
        message = f"must be {context['choices']}"
    elif kind == "string_pattern_mismatch" and context.get("pattern") == NAME_PATTERN:
        message = (
            "must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"
        )
    elif kind == "too_long":
        message = f"has too many items (at most {context.get('max_length')})"
    elif kind in _BOUNDS:
        message = f"must be {_BOUNDS[kind]} {context.get(_BOUND_KEYS[kind])}"
    elif kind == "value_error":
        message = message.removeprefix("Value error, ")
    elif kind == "assertion_error":
        message = message.removeprefix("Assertion failed, ")
    elif message.startswith("Input should be"):
        message = "must be" + message.removeprefix("Input should be")
    elif kind == "too_short":
        message = f"needs at least {context.get('min_length')} item(s)"
    return message


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
