"""MQTT topic names and filters (pure logic, MQTT 3.1.1 and 5 rules)."""

from __future__ import annotations

from collections.abc import Sequence

MAX_TOPIC_BYTES = 65_535


def check_topic_name(topic: str) -> None:
    """Raise ValueError unless ``topic`` may be published to (no wildcards)."""
    _check_common(topic)
    if "+" in topic or "#" in topic:
        raise ValueError(f"a publish topic cannot contain the wildcards '+' or '#': {topic!r}")


def check_topic_filter(topic_filter: str) -> None:
    """Raise ValueError unless ``topic_filter`` is a valid subscription filter."""
    _check_common(topic_filter)
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(
                f"'#' must be a whole level at the end of the filter: {topic_filter!r}"
            )
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level: {topic_filter!r}")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True when ``topic`` is matched by ``topic_filter``."""
    return match_levels(topic_filter.split("/"), topic.split("/"))


def match_levels(filter_levels: Sequence[str], topic_levels: Sequence[str]) -> bool:
    """Match a topic against a filter, both already split on ``/``.

    Wildcards in the first level never match topics starting with ``$`` (MQTT-4.7.2-1).
    """
    if topic_levels[0].startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[i]:
            return False
    return len(filter_levels) == len(topic_levels)


def _check_common(topic: str) -> None:
    if not topic:
        raise ValueError("a topic cannot be empty")
    if "\x00" in topic:
        raise ValueError("a topic cannot contain NUL")
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("a topic must be valid UTF-8") from None
    if size > MAX_TOPIC_BYTES:
        raise ValueError(f"a topic is at most {MAX_TOPIC_BYTES} bytes, this one has {size}")
