"""What fleetprobe exports and what a query reads, for the tests of the deploy/ files.

The exported names come from a real run's ``/metrics``, taken while it emits, so a metric
renamed in the code and not in the alert rules or the dashboard fails their tests. The
names a query reads come from its PromQL syntax tree (``promql_parser``), not a regex.
So do the label names: those of each exported series come from a real run's exposition,
and every label name a query uses (matchers, by/without, on/ignoring, group_left/right,
label_replace) is checked against what the series it reads, or the rule that records
them, really has.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import aiohttp
import promql_parser
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import run_scenario_dict, scenario_dict
from fleetprobe.app.run import RunOptions
from fleetprobe.testbed.mosquitto import free_ports
from fleetprobe.transport.mqtt import BrokerTarget, MqttSession, parse_broker_url

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy/prometheus/fleetprobe-rules.yml"

PROMETHEUS_SERIES = frozenset({"up"})
"""Series Prometheus itself makes for every target: rules may read them, fleetprobe does not
export them."""

# The series a family of each type becomes in the text format (a counter family is named
# without its _total; a gauge, an info or an untyped family is its own series).
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


async def scrape_a_run(broker_url: str, work_dir: Path) -> str:
    """The ``/metrics`` text of a short real run, scraped once its first signal is out.

    The scenario has objectives and an alert receiver, so the families that exist only with
    them are there too. Every family is registered before the first signal is sent, and a
    family without label sets still shows in the text by its ``# TYPE`` line.
    """
    prefix = f"t{uuid.uuid4().hex[:10]}"
    metrics_port, alerts_port = free_ports(2)
    scenario = scenario_dict(broker_url, prefix, duration="1s")
    scenario["slo"] = [
        {"chain": "telemetry", "success_ratio": 0.5, "p99": "1s"},
        {"chain": "telemetry", "hop": "broker", "p95": "500ms"},
    ]
    # Posted to only when a hop changes state; nothing needs to listen there.
    scenario["alerts"] = [f"http://127.0.0.1:{alerts_port}/alerts"]
    scenario["exporters"] = {"prometheus": {"listen": f"127.0.0.1:{metrics_port}"}}
    host, port, _ = parse_broker_url(broker_url)
    async with MqttSession(BrokerTarget(host, port), f"watch-{prefix}") as watcher:
        await watcher.subscribe([f"{prefix}/#"])

        async def first_message() -> object:
            return await anext(aiter(watcher.messages()))

        run = asyncio.create_task(run_scenario_dict(work_dir, scenario, timeout_s=30))
        first_signal = asyncio.create_task(first_message())
        try:
            async with asyncio.timeout(20):
                await asyncio.wait({run, first_signal}, return_when=asyncio.FIRST_COMPLETED)
            assert first_signal.done(), f"the run ended before its first signal: {run.result()}"
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
                http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response,
            ):
                assert response.status == 200
                text = await response.text()
            await run
        finally:
            first_signal.cancel()
            run.cancel()
            await asyncio.gather(run, first_signal, return_exceptions=True)
    return text


def exposed_series(text: str) -> frozenset[str]:
    """The series names a Prometheus scraping ``text`` (the text format) would store."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return frozenset(names)


async def exported_series_of_a_run(broker_url: str, work_dir: Path) -> frozenset[str]:
    """Every series name fleetprobe exports, from a real run (see :func:`scrape_a_run`)."""
    return exposed_series(await scrape_a_run(broker_url, work_dir))


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    Raises:
        ValueError: ``expr`` is not PromQL, or selects metrics by a pattern of names (which
            this check could not follow).
    """
    names: set[str] = set()
    problems: list[str] = []

    def visit(node: promql_parser.Expr) -> None:
        if not isinstance(node, promql_parser.VectorSelector):
            return
        if node.name:
            names.add(node.name)
            return
        for matcher in node.matchers.matchers:
            if matcher.name != "__name__":
                continue
            if matcher.op == promql_parser.MatchOp.Equal:
                names.add(matcher.value)
            else:
                problems.append(f"a pattern of metric names: {matcher}")

    promql_parser.walk(promql_parser.parse(expr), visit)
    if problems:
        raise ValueError(f"{expr!r}: {'; '.join(problems)}")
    return names


# The labels of what fleetprobe exports and what a query does with them.

Series = Mapping[str, frozenset[str]]
"""Each series name with the label names Prometheus stores for it."""

TARGET_LABELS = frozenset({"job", "instance"})
"""The labels every Prometheus adds to what it scrapes (deploy/prometheus has static
targets: no others; a PodMonitor adds more, which the shipped queries must not need)."""

PROMETHEUS_SERIES_LABELS: Series = {"up": TARGET_LABELS}

# Aggregations whose result keeps the input's labels (the grouping only partitions).
_SELECTING = frozenset({"topk", "bottomk", "limitk", "limit_ratio"})
# Functions whose vector argument (at this index) is a histogram's buckets: they need `le`
# and drop it.
_BUCKET_FUNCTIONS = {"histogram_quantile": 1, "histogram_fraction": 2}


class LabelError(ValueError):
    """A query uses a label name that what it reads does not have."""


async def exposition_of_every_read_family(broker_url: str, work_dir: Path) -> str:
    """The final exposition of a short real run in which the families read by deploy/ that
    have label sets only once something happens have them too: the objectives, a fault
    (``fleetprobe_fault_active``) and a full tracker (room for one signal, held by a hop
    nobody serves: ``fleetprobe_send_errors``)."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    scenario = scenario_dict(broker_url, prefix, duration="1s")
    scenario["chains"][0]["hops"].append(
        {"name": "never", "mqtt": {"topic": f"{prefix}/never/+"}, "within": "500ms"}
    )
    scenario["slo"] = [
        {"chain": "telemetry", "success_ratio": 0.5, "p99": "1s"},
        {"chain": "telemetry", "hop": "broker", "p95": "500ms"},
    ]
    scenario["faults"] = [{"name": "twice", "kind": "duplicate", "at": "0s", "for": "1s"}]
    registry = CollectorRegistry()
    options = RunOptions(handle_signals=False, registry=registry, tracker_capacity=1)
    await run_scenario_dict(work_dir, scenario, timeout_s=30, options=options)
    return generate_latest(registry).decode()  # what /metrics serves Prometheus


def series_labels(text: str) -> dict[str, frozenset[str]]:
    """Each series name of ``text`` (the text format) that has samples, with the label names
    a Prometheus scraping it stores: the samples' own and the target's."""
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, set(TARGET_LABELS)).update(sample.labels)
    return {name: frozenset(labels) for name, labels in found.items()}


def result_labels(expr: str, series: Series) -> frozenset[str] | None:
    """The label names of what ``expr`` yields (None for a scalar), given those of every
    series it may read.

    Raises:
        LabelError: ``expr`` uses a label name that what it applies to lacks: in a label
            matcher, by/without, on/ignoring, group_left/group_right, label_replace or
            label_join, or `le` of a histogram function; or it reads a series whose labels
            are unknown. Every such use is named.
        ValueError: ``expr`` is not PromQL.
    """
    problems: list[str] = []
    labels = _Labels(series, problems).of(promql_parser.parse(expr))
    if problems:
        raise LabelError(f"{expr!r}: {'; '.join(problems)}")
    return labels


class _Labels:
    """Follows label names up a PromQL syntax tree, noting every use of a missing one."""

    def __init__(self, series: Series, problems: list[str]) -> None:
        self.series = series
        self.problems = problems

    def of(self, node: promql_parser.Expr) -> frozenset[str] | None:
        if isinstance(node, promql_parser.VectorSelector):
            return self._selector(node)
        if isinstance(node, promql_parser.MatrixSelector):
            return self._selector(node.vector_selector)
        if isinstance(
            node, promql_parser.ParenExpr | promql_parser.SubqueryExpr | promql_parser.UnaryExpr
        ):
            return self.of(node.expr)
        if isinstance(node, promql_parser.AggregateExpr):
            return self._aggregate(node)
        if isinstance(node, promql_parser.Call):
            return self._call(node)
        if isinstance(node, promql_parser.BinaryExpr):
            return self._binary(node)
        if isinstance(node, promql_parser.NumberLiteral | promql_parser.StringLiteral):
            return None
        raise ValueError(f"no label rule for {type(node).__name__}: {node}")

    def need(self, names: Iterable[str], have: frozenset[str] | None, where: str) -> None:
        """Note each of ``names`` that ``have`` lacks (None: unknown or a scalar, noted
        where it came from)."""
        if have is None:
            return
        for name in names:
            if name not in have:
                self.problems.append(f"{where}: no label {name!r} in {sorted(have)}")

    def _selector(self, node: promql_parser.VectorSelector) -> frozenset[str] | None:
        name = node.name or next(
            (m.value for m in node.matchers.matchers if m.name == "__name__"), None
        )
        labels = self.series.get(name) if name else None
        if labels is None:
            self.problems.append(f"{node}: labels of {name!r} unknown (no sample in the run)")
            return None
        matchers = [*node.matchers.matchers, *(m for g in node.matchers.or_matchers for m in g)]
        used = [m.name for m in matchers if m.name != "__name__"]
        self.need(used, labels, f"matcher of {name}")
        return labels

    def _aggregate(self, node: promql_parser.AggregateExpr) -> frozenset[str] | None:
        op = str(node.op)
        if node.param is not None:
            self.of(node.param)
        inner = self.of(node.expr)
        modifier = node.modifier
        grouping = list(modifier.labels) if modifier is not None else []
        by = modifier is not None and modifier.type == promql_parser.AggModifierType.By
        self.need(grouping, inner, f"{op} {'by' if by else 'without'} ({', '.join(grouping)})")
        if inner is None:
            return None
        if op in _SELECTING:
            result = inner
        elif modifier is None:
            result = frozenset()
        elif by:
            result = frozenset(grouping)
        else:
            result = inner - set(grouping)
        if op == "count_values" and isinstance(node.param, promql_parser.StringLiteral):
            result |= {node.param.val}
        return result

    def _call(self, node: promql_parser.Call) -> frozenset[str] | None:
        name = node.func.name
        args = [self.of(arg) for arg in node.args]
        if name in ("label_replace", "label_join"):
            inner, target = args[0], node.args[1].val
            sources = [arg.val for arg in node.args[3 : 4 if name == "label_replace" else None]]
            self.need([s for s in sources if s], inner, f"{name} from")
            return None if inner is None else inner | {target}
        if name in _BUCKET_FUNCTIONS:
            buckets = args[_BUCKET_FUNCTIONS[name]]
            self.need(["le"], buckets, name)
            return None if buckets is None else buckets - {"le"}
        if name in ("absent", "absent_over_time"):
            selector = node.args[0]
            if isinstance(selector, promql_parser.MatrixSelector):
                selector = selector.vector_selector
            if not isinstance(selector, promql_parser.VectorSelector):
                return frozenset()
            return frozenset(
                m.name
                for m in selector.matchers.matchers
                if m.op == promql_parser.MatchOp.Equal and m.name != "__name__"
            )
        if name == "vector":
            return frozenset()
        if node.func.return_type == promql_parser.ValueType.Scalar:
            return None
        return next((labels for labels in args if labels is not None), None)

    def _binary(self, node: promql_parser.BinaryExpr) -> frozenset[str] | None:
        left, right = self.of(node.lhs), self.of(node.rhs)
        if left is None or right is None:  # a scalar side (or an unknown one, noted)
            return left if right is None else right
        op, modifier = str(node.op), node.modifier
        matching = modifier.matching if modifier is not None else None
        on = matching is not None and matching.type == promql_parser.LabelModifierType.Include
        listed = list(matching.labels) if matching is not None else []
        if on:  # matched on these: both sides need them
            self.need(listed, left, f"left of {op} on ({', '.join(listed)})")
            self.need(listed, right, f"right of {op} on ({', '.join(listed)})")
        else:
            self.need(listed, left | right, f"{op} ignoring ({', '.join(listed)})")
        card = modifier.card if modifier is not None else None
        included = list(modifier.group_labels or []) if modifier is not None else []
        if op in ("and", "unless"):
            return left
        if op == "or":
            return left | right
        if card == promql_parser.VectorMatchCardinality.ManyToOne:
            self.need(included, right, f"group_left ({', '.join(included)})")
            return left | set(included)
        if card == promql_parser.VectorMatchCardinality.OneToMany:
            self.need(included, left, f"group_right ({', '.join(included)})")
            return right | set(included)
        # One to one: the result has the left side's labels, only those matched on with
        # on (...), less the ignored ones with ignoring (...).
        return frozenset(listed) if on else left - set(listed)


def with_recorded(series: Series) -> dict[str, frozenset[str]]:
    """``series`` and the series the rules file records, each with the labels its rules
    keep (their expression's result and their own ``labels``; for a name several rules
    record, only the labels all of them keep). A rule that fails the label check records
    nothing here (test_alert_rules names it)."""
    known = dict(series)
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" not in rule:
                continue
            try:
                labels = result_labels(rule["expr"], known)
            except LabelError:
                continue
            kept = (labels or frozenset()) | set(rule.get("labels", {}))
            known[rule["record"]] = known.get(rule["record"], kept) & kept
    return known


_EXPORTED_LABELS: dict[str, dict[str, frozenset[str]]] = {}


def exported_labels(broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Series:
    """The label names of every series fleetprobe exports with samples, from the run of
    :func:`exposition_of_every_read_family`: one run per session and broker, in a loop of
    its own (the tests' loops stay untouched)."""
    if broker_url not in _EXPORTED_LABELS:
        with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
            work_dir = tmp_path_factory.mktemp("labels")
            text = runner.run(exposition_of_every_read_family(broker_url, work_dir))
        _EXPORTED_LABELS[broker_url] = series_labels(text)
    return _EXPORTED_LABELS[broker_url]
