"""The scenario format (v1) as typed models.

Every model forbids unknown keys. Hop kinds are not listed here: each hop kind's module in
``probes.observers`` brings its own config model, and :data:`Hop` gets one optional key per
registered kind, of which a hop sets exactly one.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)

from fleetprobe.app.scenario.faults import ExpectConfig, FaultsConfig
from fleetprobe.app.scenario.messages import NAME_PATTERN
from fleetprobe.core.durations import Duration, parse_duration
from fleetprobe.probes.json_paths import PathText
from fleetprobe.probes.observers import hop_kinds
from fleetprobe.simulator.fleet import SIGNAL_FIELDS, TOPIC_FIELDS
from fleetprobe.simulator.templates import PayloadTemplate, TemplateError, TextTemplate
from fleetprobe.transport.mqtt import parse_broker_url
from fleetprobe.transport.servers import split_listen
from fleetprobe.transport.topics import check_topic_name

PositiveDuration = Annotated[Duration, Field(gt=0)]
MIN_INTERVAL_S = 0.001
"""The shortest interval between two signals of a vehicle (the fleet clock's step)."""
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
_JITTER_PERCENT = re.compile(r"(\d+(?:\.\d*)?)%")


class Strict(BaseModel):
    """Base of every scenario model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _protocol_input(value: Any) -> Any:
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


class TlsFiles(Strict):
    """TLS material, relative to the scenario file."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @model_validator(mode="after")
    def _key_with_cert(self) -> TlsFiles:
        if self.key and not self.cert:
            raise ValueError("key needs cert")
        return self


class PersistentSession(Strict):
    """A session the broker keeps while its connection is down (README: Persistent
    sessions): nothing it acknowledged, or was about to deliver, is lost over a restart."""

    expiry: PositiveDuration = Field(
        description="how long the broker keeps the session while disconnected (1s to ~136y)"
    )

    @field_validator("expiry")
    @classmethod
    def _whole_seconds(cls, expiry: float) -> float:
        if not 1 <= expiry <= 0xFFFFFFFE:
            raise ValueError("expiry must be from 1s to 4294967294s (MQTT's Session Expiry)")
        return expiry


class MqttTargetConfig(Strict):
    """The broker of the platform under test."""

    url: str
    username: str | None = None
    password: SecretStr | None = None
    protocol: Annotated[Literal["5", "3.1.1"], BeforeValidator(_protocol_input)] = "5"
    tls: TlsFiles | None = None
    sessions: Literal["per_vehicle", "pooled"] = "per_vehicle"
    pool: int = Field(4, ge=1, le=10_000)
    keepalive: PositiveDuration = 30.0
    ack_timeout: PositiveDuration = Field(
        10.0, description="how long a QoS 1/2 publish waits for its acknowledgement"
    )
    via: str | None = Field(None, description="the proxy (faults.proxies) the fleet goes through")
    session: PersistentSession | None = Field(
        None, description="persistent sessions for the fleet and the observers (default: clean)"
    )
    inflight: int | None = Field(
        None,
        ge=1,
        le=65_535,
        description="QoS 1/2 publishes a session leaves unacknowledged at most (default: the "
        "broker's Receive Maximum in MQTT 5, 20 in 3.1.1, which announces none)",
    )
    downgrade_qos: bool = Field(
        False,
        description="send signals above the broker's Maximum QoS at that maximum (default: "
        "refuse to start, exit 3)",
    )

    @field_validator("url")
    @classmethod
    def _valid_url(cls, url: str) -> str:
        parse_broker_url(url)
        return url


class Target(Strict):
    """Where the platform under test is."""

    mqtt: MqttTargetConfig


class AreaConfig(Strict):
    """The disc vehicles drive in."""

    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    radius_km: float = Field(gt=0, le=500)


def parse_jitter(text: str) -> tuple[float, float]:
    """``10%`` as (0.10, 0.0), a duration as (0.0, seconds)."""
    stripped = text.strip()
    if stripped.endswith("%"):
        match = _JITTER_PERCENT.fullmatch(stripped)
        if not match or float(match.group(1)) > 100:
            raise ValueError(f"{text!r} is not a percentage from 0% to 100%")
        return float(match.group(1)) / 100.0, 0.0
    return 0.0, parse_duration(stripped)


class CadenceConfig(Strict):
    """``{every: 1s, jitter: 10%}``: jitter is a share of ``every`` or a duration (±)."""

    every: PositiveDuration
    jitter: Annotated[str, WithJsonSchema({"type": "string", "examples": ["10%", "50ms"]})] = "0s"

    @field_validator("jitter", mode="before")
    @classmethod
    def _valid_jitter(cls, jitter: Any) -> Any:
        if isinstance(jitter, str):
            parse_jitter(jitter)
        elif isinstance(jitter, int | float) and not isinstance(jitter, bool):
            raise ValueError(f"{jitter} has no unit: write a percentage (10%) or a duration (50ms)")
        return jitter

    @property
    def jitter_s(self) -> float:
        """The jitter as seconds (±)."""
        share, seconds = parse_jitter(self.jitter)
        return self.every * share + seconds

    @model_validator(mode="after")
    def _jitter_below_every(self) -> CadenceConfig:
        if self.jitter_s >= self.every:
            raise ValueError("jitter must be smaller than every")
        if self.every - self.jitter_s < MIN_INTERVAL_S:
            # The fleet's clock steps no finer: a shorter interval would be stretched to it.
            raise ValueError(
                f"every{' minus its jitter' if self.jitter_s else ''} must be at least 1ms "
                f"(is {(self.every - self.jitter_s) * 1000:g}ms)"
            )
        return self


class ProfileConfig(Strict):
    """A kind of vehicle in the fleet."""

    name: Name
    weight: float = Field(1.0, gt=0)
    speed_kmh: tuple[float, float] = (20.0, 90.0)
    powertrain: Literal["electric", "combustion"] = "electric"
    signals: dict[str, CadenceConfig] = Field(min_length=1)

    @field_validator("speed_kmh")
    @classmethod
    def _ordered_speeds(cls, speeds: tuple[float, float]) -> tuple[float, float]:
        low, high = speeds
        if not 0 <= low <= high <= 400:
            raise ValueError("must be [low, high] with 0 <= low <= high <= 400")
        return speeds


class FleetConfig(Strict):
    """The simulated fleet."""

    vehicles: int = Field(ge=1, le=1_000_000)
    area: AreaConfig
    profiles: list[ProfileConfig] = Field(min_length=1)


class SignalConfig(Strict):
    """How a signal kind goes on the wire: its topic template, QoS and JSON payload template."""

    topic: str
    qos: Literal[0, 1, 2] = 0
    payload: dict[str, Any] = Field(min_length=1)

    @field_validator("topic")
    @classmethod
    def _valid_topic(cls, topic: str) -> str:
        check_topic_name(topic.replace("{", "").replace("}", ""))
        template = TextTemplate(topic, TOPIC_FIELDS)
        check_topic_name(template.render_text(dict.fromkeys(TOPIC_FIELDS, "X")))
        return topic

    @field_validator("payload")
    @classmethod
    def _valid_payload(cls, payload: dict[str, Any]) -> dict[str, Any]:
        PayloadTemplate(payload, SIGNAL_FIELDS)
        return payload


class HopBase(Strict):
    """A hop's common keys; the kind's key (``mqtt``, ...) is added per registered kind."""

    name: Name
    within: PositiveDuration
    expect: dict[PathText, str | int | float | bool | None] = Field(default_factory=dict)

    @field_validator("expect")
    @classmethod
    def _valid_expectations(cls, expect: dict[str, Any]) -> dict[str, Any]:
        for path, value in expect.items():
            if isinstance(value, str):
                try:
                    TextTemplate(value, SIGNAL_FIELDS)
                except TemplateError as error:
                    raise TemplateError(str(error), (path,)) from None
        return expect

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> HopBase:
        kinds = [kind for kind in hop_kinds() if getattr(self, kind, None) is not None]
        if len(kinds) != 1:
            raise ValueError(
                f"a hop needs exactly one kind ({', '.join(hop_kinds())}); "
                + (f"this one has {', '.join(kinds)}" if kinds else "this one has none")
            )
        return self

    @property
    def kind(self) -> tuple[str, Any]:
        """The hop's kind and its config."""
        for kind in hop_kinds():
            config = getattr(self, kind, None)
            if config is not None:
                return kind, config
        raise AssertionError("validated hops have a kind")


Hop: type[HopBase] = create_model(  # type: ignore[call-overload]
    "Hop",
    __base__=HopBase,
    __doc__="One observable event of a chain, with its deadline from the send.",
    **{kind: (observer.config_model | None, None) for kind, observer in hop_kinds().items()},
)


class ChainConfig(Strict):
    """An ordered list of hops that a signal passes."""

    name: Name
    signal: str
    sample: float = Field(1.0, gt=0, le=1)
    hops: list[Hop] = Field(min_length=1)


class ObjectiveConfig(Strict):
    """Objectives for a chain, or for one hop of it; each metric given is one objective."""

    chain: str
    hop: str | None = None
    success_ratio: float | None = Field(None, ge=0, le=1)
    p50: PositiveDuration | None = None
    p90: PositiveDuration | None = None
    p95: PositiveDuration | None = None
    p99: PositiveDuration | None = None
    max: PositiveDuration | None = None

    @model_validator(mode="after")
    def _some_metric(self) -> ObjectiveConfig:
        if not self.metrics():
            raise ValueError("give at least one of success_ratio, p50, p90, p95, p99, max")
        return self

    def metrics(self) -> dict[str, float]:
        """The objectives that are set, by metric name."""
        names = ("success_ratio", "p50", "p90", "p95", "p99", "max")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def _listen_input(value: Any) -> Any:
    if isinstance(value, str):
        split_listen(value)
    return value


Listen = Annotated[str, BeforeValidator(_listen_input)]


class PrometheusExporterConfig(Strict):
    """Serve /metrics while the run lasts."""

    listen: Listen = "127.0.0.1:9464"
    linger: Annotated[Duration, Field(ge=0)] = Field(
        0.0,
        description="after the reports are written, keep serving /metrics this long, so "
        "that a last scrape sees the final counts (a signal ends it early)",
    )


class WebhookReceiverConfig(Strict):
    """Where webhook hops are served (each at its path)."""

    listen: Listen = "127.0.0.1:9465"


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
}


def _size_input(value: Any) -> Any:
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match is None:
            raise ValueError("a size is a number and a unit: B, KB, MB, GB, KiB, MiB or GiB")
        return int(float(match[1]) * _SIZE_UNITS[match[2]])
    return value


ByteSize = Annotated[int, BeforeValidator(_size_input), Field(ge=4096)]


class TraceLogConfig(Strict):
    """``traces: {path, sample_ok, max_size, keep}``: the trace log kept to a size. Every
    signal that is not ok is written; of the ok ones, the share ``sample_ok``."""

    path: str
    sample_ok: float = Field(1.0, ge=0, le=1, description="share of ok signals written")
    max_size: ByteSize | None = Field(
        None, description="rotate at this size (e.g. 100MB): the file becomes PATH.1"
    )
    keep: int = Field(5, ge=1, le=1000, description="rotated files kept (PATH.1 .. PATH.N)")


def _traces_kind(entry: Any) -> str:
    return "path" if isinstance(entry, str) else "log"


class ExportersConfig(Strict):
    """Where results go. Output paths are relative to the working directory."""

    prometheus: PrometheusExporterConfig | None = None
    webhook_receiver: WebhookReceiverConfig = Field(default_factory=WebhookReceiverConfig)
    json_path: str | None = Field(None, alias="json")
    junit: str | None = None
    traces: (
        Annotated[
            Annotated[str, Tag("path")] | Annotated[TraceLogConfig, Tag("log")],
            Discriminator(_traces_kind),
        ]
        | None
    ) = None

    @property
    def trace_log(self) -> TraceLogConfig | None:
        """``traces`` as a whole configuration (a plain path keeps every line, unrotated)."""
        if isinstance(self.traces, str):
            return TraceLogConfig(path=self.traces)
        return self.traces


class HealthConfig(Strict):
    """When a hop counts as up while the run goes on (``fleetprobe_hop_up``)."""

    window: PositiveDuration = 30.0
    min_success_ratio: float = Field(0.95, ge=0, le=1)
    min_samples: int = Field(1, ge=1)


def _alert_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return url


AlertUrl = Annotated[str, AfterValidator(_alert_url)]


class AlertDestination(Strict):
    """``{alertmanager: URL}``: an Alertmanager, at its base URL (alerts go to its API,
    /api/v2/alerts); ``{webhook: URL}``: a receiver of Alertmanager's webhook format (the
    same as a plain URL)."""

    alertmanager: AlertUrl | None = None
    webhook: AlertUrl | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> AlertDestination:
        if (self.alertmanager is None) == (self.webhook is None):
            raise ValueError("give exactly one of alertmanager or webhook")
        return self


def _alert_kind(entry: Any) -> str:
    return "webhook_url" if isinstance(entry, str) else "destination"


# Told apart by type before validation, so that a wrong entry gets the one error that fits.
AlertEntry = Annotated[
    Annotated[AlertUrl, Tag("webhook_url")] | Annotated[AlertDestination, Tag("destination")],
    Discriminator(_alert_kind),
]


class Scenario(Strict):
    """A whole scenario file."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: Name
    duration: PositiveDuration
    seed: int = 0
    speed: float = Field(1.0, gt=0, le=10_000)
    target: Target
    fleet: FleetConfig
    signals: dict[Name, SignalConfig] = Field(min_length=1)
    chains: list[ChainConfig] = Field(default_factory=list)
    slo: list[ObjectiveConfig] = Field(default_factory=list)
    health: HealthConfig = Field(default_factory=HealthConfig)
    alerts: list[AlertEntry] = Field(
        default_factory=list,
        description="where hop health changes go: a webhook URL, {webhook: URL} or "
        "{alertmanager: URL}",
    )
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    expect: list[ExpectConfig] = Field(default_factory=list)
    exporters: ExportersConfig = ExportersConfig()
