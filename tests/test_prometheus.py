"""A real Prometheus (Debian's `prometheus`) scrapes a run; its answers match report.json."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import mqtt_hops_of_the_testbed, run_scenario_dict, scenario_dict
from fleetprobe.exporters.metrics import LATENCY_BUCKETS
from fleetprobe.testbed.knobs import StageKnobs
from fleetprobe.testbed.mosquitto import free_ports
from fleetprobe.testbed.platform import Testbed
from fleetprobe.testbed.topics import TestbedTopics
from fleetprobe.transport.mqtt import BrokerTarget

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.needs_tool("prometheus", "prometheus"),
]


@asynccontextmanager
async def prometheus_server(folder: Path, port: int, target_port: int) -> AsyncIterator[str]:
    """Prometheus on 127.0.0.1:``port`` scraping fleetprobe at ``target_port`` every 0.5 s."""
    config = folder / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 500ms, scrape_timeout: 400ms}\n"
        "scrape_configs:\n"
        "  - job_name: fleetprobe\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
    )
    process = await asyncio.create_subprocess_exec(
        "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(30):
            while True:
                try:
                    async with http.get(f"{url}/-/ready") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)  # polling a starting server: no event to await
        yield url
    finally:
        process.terminate()
        async with asyncio.timeout(20):
            await process.wait()


async def query(url: str, promql: str) -> list[dict[str, Any]]:
    """The result vector of an instant query."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}/api/v1/query", params={"query": promql}) as response,
    ):
        body = await response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def bucket_around(value: float) -> tuple[float, float]:
    """The latency bucket (lower, upper] that holds ``value``."""
    lower = 0.0
    for upper in (*LATENCY_BUCKETS, math.inf):
        if value <= upper:
            return lower, upper
        lower = upper
    raise AssertionError(value)


async def test_prometheus_queries_agree_with_the_report(
    tmp_path: Path, broker_url: str, broker: BrokerTarget, prefix: str
) -> None:
    """Per-hop success ratios from Prometheus equal the report's; each hop's p99 from
    histogram_quantile falls in the same latency bucket as the report's exact p99."""
    prometheus_port, metrics_port = free_ports(2)
    chain = {"name": "telemetry", "signal": "telemetry", "hops": mqtt_hops_of_the_testbed(prefix)}
    scenario = scenario_dict(broker_url, prefix, duration="4s", chains=[chain])
    scenario["exporters"] = {
        "prometheus": {"listen": f"127.0.0.1:{metrics_port}", "linger": "2s"},
        "json": str(tmp_path / "report.json"),
    }
    knobs = {
        "gateway": StageKnobs(delay_s=0.03),  # latencies across several buckets
        "processor": StageKnobs(drop_ratio=0.25, seed=5),
    }
    async with (
        prometheus_server(tmp_path, prometheus_port, metrics_port) as url,
        Testbed(broker, topics=TestbedTopics.under(prefix), knobs=knobs, seed=3),
    ):
        result = await run_scenario_dict(tmp_path, scenario)
        report = result.report
        sent = report["signals"]["telemetry"]["sent"]
        # Counters only grow: their highest scraped value is the final one, which the
        # linger after the reports lets Prometheus see.
        final = 'max_over_time(fleetprobe_signals_sent_total{scenario="test"}[5m])'
        async with asyncio.timeout(10):
            while True:
                found = await query(url, final)
                if found and float(found[0]["value"][1]) == sent:
                    break
                await asyncio.sleep(0.2)  # the next scrape; Prometheus has no push to await
        ratios = await query(
            url,
            'sum by (hop) (max_over_time(fleetprobe_hop_results_total{result="ok"}[5m]))'
            " / sum by (hop) (max_over_time(fleetprobe_hop_results_total[5m]))",
        )
        p99s = await query(
            url,
            "histogram_quantile(0.99, sum by (hop, le) "
            "(max_over_time(fleetprobe_hop_latency_seconds_bucket[5m])))",
        )

    hops = report["chains"]["telemetry"]["hops"]
    assert sent > 100
    assert hops["processor"]["results"]["timeout"] > 0  # the dropped quarter
    measured_ratio = {r["metric"]["hop"]: float(r["value"][1]) for r in ratios}
    measured_p99 = {r["metric"]["hop"]: float(r["value"][1]) for r in p99s}
    assert set(measured_ratio) == set(measured_p99) == set(hops)
    for name, hop in hops.items():
        counted = sum(hop["results"].values())
        assert measured_ratio[name] == pytest.approx(hop["results"]["ok"] / counted), name
        lower, upper = bucket_around(measured_p99[name])
        assert lower <= hop["latency_s"]["p99"] <= upper, (name, measured_p99[name], hop)
    assert measured_ratio["processor"] < 0.9 < measured_ratio["broker"] == 1.0
