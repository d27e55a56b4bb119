"""The testbed's topics: where signals come in, and where events and state go out."""

from __future__ import annotations

from dataclasses import dataclass

VIN_PLACEHOLDER = "{vin}"


@dataclass(frozen=True, slots=True)
class TestbedTopics:
    """The topic of each hop of the chain.

    Attributes:
        vehicles: the filter the gateway consumes; its first ``+`` level is the VIN.
        events: the gateway's output, with ``{vin}``; the processor consumes it.
        state: the processor's output, with ``{vin}``.
    """

    __test__ = False  # not a pytest test class, despite the name

    vehicles: str = "vehicles/+/+"
    events: str = "platform/events/{vin}"
    state: str = "platform/state/{vin}"

    @classmethod
    def under(cls, prefix: str) -> TestbedTopics:
        """The default topics with ``prefix/`` in front of each (for isolated tests)."""
        base = cls()
        return cls(
            vehicles=f"{prefix}/{base.vehicles}",
            events=f"{prefix}/{base.events}",
            state=f"{prefix}/{base.state}",
        )


def as_filter(template: str) -> str:
    """The subscription filter matching every topic of a ``{vin}`` template."""
    return template.replace(VIN_PLACEHOLDER, "+")


def topic_for(template: str, vin: str) -> str:
    """The topic of a ``{vin}`` template for one vehicle."""
    return template.replace(VIN_PLACEHOLDER, vin)


def vin_from_topic(topic_filter: str, topic: str) -> str | None:
    """The level of ``topic`` that the first ``+`` of ``topic_filter`` matched.

    Falls back to the second-to-last level (``.../V1/telemetry``) when the filter has no
    ``+``; None when the topic is too short.
    """
    levels = topic.split("/")
    filter_levels = topic_filter.split("/")
    index = filter_levels.index("+") if "+" in filter_levels else len(levels) - 2
    return levels[index] if 0 <= index < len(levels) and levels[index] else None


def valid_vin(vin: str) -> bool:
    """Whether ``vin`` can stand in a topic level (no separators or wildcards)."""
    return bool(vin) and not any(char in vin for char in "/+#\x00")
