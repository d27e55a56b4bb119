"""Fuzzing with hypothesis: what fleetprobe parses from the outside raises nothing but the
project's own errors, whatever it is fed. The budget is bounded (``FUZZ_EXAMPLES``)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetprobe.app.scenario import ScenarioError
from fleetprobe.app.scenario.loader import parse_scenario
from fleetprobe.faults.mqtt_frames import MalformedError, MqttFramer, Session, inspect_publish
from fleetprobe.probes.trace_ids import TraceIdReader, Unmatched, compile_path, parse_json
from fleetprobe.transport.mqtt_codec import (
    MqttError,
    decode_packet,
    decode_publish_head,
    decode_server_packet,
)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a shared machine: time is not the property under test
    suppress_health_check=[HealthCheck.too_slow],
    database=None,  # no example files written into the checkout
)

VALID = """\
name: fuzz
duration: 10s
target: {mqtt: {url: "mqtt://127.0.0.1:1883"}}
fleet:
  vehicles: 2
  area: {lat: 48.78, lon: 9.18, radius_km: 5}
  profiles: [{name: car, signals: {telemetry: {every: 1s}}}]
signals:
  telemetry:
    topic: vehicles/{vin}/telemetry
    payload: {vin: "{vin}", trace_id: "{trace_id}"}
chains:
  - name: telemetry
    signal: telemetry
    hops: [{name: broker, mqtt: {topic: vehicles/+/telemetry}, within: 500ms}]
slo: [{chain: telemetry, success_ratio: 0.99}]
"""

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["10s", "500ms", "-1s", "{vin}", "{x.__class__}", "${MISSING}", "$.a[0]"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)


def paths_of(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a YAML tree, for replacing one of them."""
    places = [path]
    if isinstance(node, dict):
        for key, child in node.items():
            places += paths_of(child, (*path, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            places += paths_of(child, (*path, index))
    return places


def replaced(tree: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy = dict(tree) if isinstance(tree, dict) else list(tree)
    copy[head] = replaced(tree[head], rest, value)
    return copy


VALID_TREE = yaml.safe_load(VALID)
PLACES = paths_of(VALID_TREE)


def loads_or_says_why(text: str) -> None:
    try:
        parse_scenario(text, "fuzz.yaml", environ={})
    except ScenarioError as error:
        assert str(error).startswith("fuzz.yaml")  # every problem names its place


@FUZZ
@given(st.text(max_size=400))
def test_any_text_is_a_scenario_or_a_scenario_error(text: str) -> None:
    loads_or_says_why(text)


@FUZZ
@given(st.sampled_from(PLACES), values)
def test_a_valid_scenario_with_one_part_replaced_loads_or_says_why(
    place: tuple[Any, ...], value: Any
) -> None:
    loads_or_says_why(yaml.safe_dump(replaced(VALID_TREE, place, value)))


@FUZZ
@given(st.integers(0, len(VALID)), st.text(max_size=20))
def test_a_valid_scenario_with_text_spliced_in_loads_or_says_why(at: int, text: str) -> None:
    loads_or_says_why(VALID[:at] + text + VALID[at:])


@FUZZ
@given(st.binary(max_size=300) | values.map(lambda v: yaml.safe_dump(v).encode()))
def test_trace_id_extractors_read_any_body(payload: bytes) -> None:
    body = parse_json(payload)
    pairs = [("traceparent", payload.decode("utf-8", "replace"))]
    for reader in (
        TraceIdReader(None, None),
        TraceIdReader("$.meta.trace_id", None),
        TraceIdReader("$.a[0].b", None),
        TraceIdReader(None, "traceparent"),
    ):
        try:
            trace_id = reader.read(body, pairs)
        except Unmatched:
            continue
        assert len(trace_id) == 32 and int(trace_id, 16) != 0


@FUZZ
@given(st.text(max_size=40))
def test_a_trace_id_path_compiles_or_is_a_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        compile_path(text)


@FUZZ
@given(st.integers(0, 255), st.binary(max_size=200), st.sampled_from([4, 5]))
def test_the_mqtt_codec_decodes_any_packet_or_raises_its_own_error(
    first_byte: int, body: bytes, level: int
) -> None:
    for decode in (decode_packet, decode_server_packet):
        with contextlib.suppress(MqttError):
            decode(first_byte, body, level)
    with contextlib.suppress(MqttError):
        decode_publish_head(first_byte, body)


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=8), st.sampled_from(["upstream", "downstream"]))
def test_the_fault_proxy_framer_takes_any_stream(chunks: list[bytes], direction: str) -> None:
    """The proxy's lenient framer never raises: malformed streams pass through as raw."""
    framer = MqttFramer(direction)
    session = Session()
    passed = b""
    for chunk in chunks:
        for packet in framer.feed(chunk):
            passed += packet.data
            if packet.kind == 1:
                session.learn_connect(packet)
            elif packet.kind == 3:  # PUBLISH: what MQTT-aware toxics look into
                with contextlib.suppress(MalformedError):
                    inspect_publish(packet, session, direction)
    passed += framer.flush()
    assert passed == b"".join(chunks)  # nothing lost, nothing added
