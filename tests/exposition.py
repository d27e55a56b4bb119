"""What fleetprobe exports and what a query reads, for the tests of the deploy/ files.

The exported names come from a real run's ``/metrics``, taken while it emits, so a metric
renamed in the code and not in the alert rules or the dashboard fails their tests. The
names a query reads come from its PromQL syntax tree (``promql_parser``), not a regex.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import aiohttp
import promql_parser
from prometheus_client.parser import text_string_to_metric_families

from conftest import run_scenario_dict, scenario_dict
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
