"""The scenario's fault timeline and the outcomes expected of it (models).

A fault is a window ``[at, at + for)`` of the run in which something is broken on
purpose: a toxic on a proxy, a proxy that is down, a fault of the fleet, or a stage of
the platform through its control endpoint. Each kind has its own attributes, written
beside the common keys and checked against the kind's model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fleetprobe.app.scenario.messages import error_message
from fleetprobe.core.durations import Duration, parse_duration
from fleetprobe.core.errors import FleetprobeError
from fleetprobe.faults.toxics import Attributes, Toxic
from fleetprobe.transport.servers import split_listen

Ratio = Annotated[float, Field(gt=0, le=1)]
NonNegativeDuration = Annotated[Duration, Field(ge=0)]
PositiveDuration = Annotated[Duration, Field(gt=0)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$", max_length=64)]


class FaultError(FleetprobeError, ValueError):
    """A problem with one key of a fault entry; ``path`` leads to it from the entry."""

    def __init__(self, message: str, path: tuple[str | int, ...]) -> None:
        super().__init__(message)
        self.path = path


def _signed_duration(value: Any) -> Any:
    if isinstance(value, str) and value.strip().startswith("-"):
        return -parse_duration(value.strip()[1:])
    return value


class MalformedAttributes(Attributes):
    ratio: Ratio = 1.0


class DuplicateAttributes(Attributes):
    ratio: Ratio = 1.0


class OfflineAttributes(Attributes):
    share: Ratio = 1.0


class ClockSkewAttributes(Attributes):
    skew: Annotated[float, Field(description="like 30s or -2m")]
    share: Ratio = 1.0

    @field_validator("skew", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        value = _signed_duration(value)
        return parse_duration(value) if isinstance(value, str) else value


class ReconnectStormAttributes(Attributes):
    jitter: NonNegativeDuration = 0.0


class StageAttributes(Attributes):
    delay: NonNegativeDuration | None = None
    jitter: NonNegativeDuration | None = None
    drop: Annotated[float, Field(ge=0, le=1)] | None = None
    stall: NonNegativeDuration | None = None

    @model_validator(mode="after")
    def _something(self) -> StageAttributes:
        if self.delay is None and self.jitter is None and self.drop is None and self.stall is None:
            raise ValueError("give at least one of delay, jitter, drop, stall")
        return self


class DownAttributes(Attributes):
    pass


FLEET_KINDS: dict[str, type[Attributes]] = {
    "malformed": MalformedAttributes,
    "duplicate": DuplicateAttributes,
    "offline": OfflineAttributes,
    "clock_skew": ClockSkewAttributes,
    "reconnect_storm": ReconnectStormAttributes,
}
"""Faults of the simulated fleet (target: ``fleet``)."""
INSTANT_KINDS = frozenset({"reconnect_storm"})
"""Kinds that happen once, at ``at``, and take no ``for``."""


def fault_kinds() -> dict[str, type[Attributes]]:
    """Every kind a fault may have, with its attributes model."""
    toxics = {kind: toxic.attributes_model for kind, toxic in Toxic.registry.items()}
    return {**toxics, "down": DownAttributes, "stage": StageAttributes, **FLEET_KINDS}


def target_of(kind: str) -> Literal["proxy", "fleet", "stage"]:
    """What a fault of ``kind`` acts on."""
    if kind in FLEET_KINDS:
        return "fleet"
    return "stage" if kind == "stage" else "proxy"


class FaultConfig(BaseModel):
    """One fault window; keys beyond the common ones are the kind's attributes."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    name: Name | None = None
    kind: str
    at: NonNegativeDuration
    for_: PositiveDuration | None = Field(None, alias="for")
    target: str = Field("fleet", description="a proxy's name, 'fleet', or a stage's control URL")
    stream: Literal["upstream", "downstream"] = "downstream"
    toxicity: float = Field(1.0, ge=0, le=1)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in fault_kinds():
            raise ValueError(f"unknown fault kind '{kind}'; kinds: {', '.join(fault_kinds())}")
        return kind

    @model_validator(mode="after")
    def _checked(self) -> FaultConfig:
        if self.kind in INSTANT_KINDS:
            if self.for_ is not None:
                raise FaultError(f"a {self.kind} happens once: it takes no 'for'", ("for",))
        elif self.for_ is None:
            raise FaultError("missing required key 'for' (how long the fault lasts)", ())
        if target_of(self.kind) == "stage":
            parts = urlsplit(self.target)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise FaultError(
                    "a stage fault's target is its control URL, like "
                    "http://127.0.0.1:8080/control/processor",
                    ("target",),
                )
        try:
            self.attributes()
        except ValidationError as error:
            first = error.errors()[0]
            where = tuple(first["loc"])
            message = error_message(first)
            if first["type"] == "extra_forbidden":
                common = [field.alias or name for name, field in type(self).model_fields.items()]
                keys = ", ".join([*common, *fault_kinds()[self.kind].model_fields])
                message = f"unknown key '{where[-1]}' (a {self.kind} fault takes: {keys})"
            raise FaultError(message, where) from None
        return self

    def attributes(self) -> dict[str, Any]:
        """The kind's attributes, validated, with their defaults."""
        model = fault_kinds()[self.kind]
        return model.model_validate(self.model_extra or {}).model_dump(exclude_none=True)

    @property
    def label(self) -> str:
        """The fault's name, or ``<kind>@<at>`` when it has none."""
        return self.name or f"{self.kind}@{self.at:g}s"

    @property
    def end(self) -> float:
        """When the window closes, in seconds from the start of emission."""
        return self.at + (self.for_ or 0.0)


def _upstream(value: str) -> str:
    split_listen(value)
    return value


class ProxyConfig(BaseModel):
    """A TCP proxy the fault timeline can act on (``target.mqtt.via`` routes the fleet)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    upstream: Annotated[str, Field(description="HOST:PORT")]
    listen: str = "127.0.0.1:0"

    @field_validator("upstream", "listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        return _upstream(value)


class FaultsConfig(BaseModel):
    """Fault injection: proxies, the backend that runs them, and the timeline.

    ``faults: [...]`` is short for ``faults: {timeline: [...]}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["builtin", "toxiproxy"] = "builtin"
    toxiproxy: str = Field(
        "http://127.0.0.1:8474", description="the Toxiproxy API, with backend: toxiproxy"
    )
    proxies: list[ProxyConfig] = Field(default_factory=list)
    timeline: list[FaultConfig] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _timeline_alone(cls, value: Any) -> Any:
        return {"timeline": value} if isinstance(value, list) else value


class LatencyRange(BaseModel):
    """How much slower a hop should be during a fault than outside every fault."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: Duration | None = None
    max: Duration | None = None

    @model_validator(mode="after")
    def _a_bound(self) -> LatencyRange:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not exceed max")
        return self


class ExpectConfig(BaseModel):
    """What a fault must do to a chain, and how the chain must come back.

    Each key given is one outcome, judged at the end of the run:

    * ``fails_at``: the chain's signals sent during the fault fail at this hop (at least
      ``min_ratio`` of them) and at no hop before it;
    * ``recovers_within``: after the fault ends, ``hop`` (default: ``fails_at``) is ok
      again within this time (``fleetprobe_recovery_seconds``);
    * ``latency_added``: ``hop``'s median latency during the fault minus its median
      outside every fault lies within ``min``..``max``;
    * ``no_loss_outside``: every signal of the chain sent outside every fault window
      (and ``margin`` around each) ends ``ok``;
    * ``unaffected``: every signal of the chain sent during the fault ends ``ok`` (the
      fault must not reach this chain).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    fault: str
    chain: str
    hop: str | None = None
    fails_at: str | None = None
    min_ratio: Ratio = 0.9
    recovers_within: PositiveDuration | None = None
    latency_added: LatencyRange | None = None
    no_loss_outside: bool = False
    unaffected: bool = False
    margin: NonNegativeDuration | None = Field(
        None, description="around each window; default: the chain's longest within"
    )

    @model_validator(mode="after")
    def _an_outcome(self) -> ExpectConfig:
        if not self.outcomes():
            raise ValueError(
                "give at least one of fails_at, recovers_within, latency_added, "
                "no_loss_outside, unaffected"
            )
        if (self.recovers_within or self.latency_added) and not (self.hop or self.fails_at):
            raise ValueError("recovers_within and latency_added need hop (or fails_at)")
        return self

    def outcomes(self) -> list[str]:
        """The outcomes this entry asks for, by key."""
        keys = ("fails_at", "recovers_within", "latency_added")
        given = [key for key in keys if getattr(self, key) is not None]
        flags = ("no_loss_outside", "unaffected")
        return given + [flag for flag in flags if getattr(self, flag)]

    @property
    def judged_hop(self) -> str | None:
        """The hop that ``recovers_within`` and ``latency_added`` judge."""
        return self.hop or self.fails_at
