"""Where results go: Prometheus metrics and /metrics, report.json, traces.jsonl, the summary."""

from exporters.metrics import ProbeMetrics
from exporters.report import build_report, write_json
from exporters.results import ResultBook
from exporters.server import make_metrics_app
from exporters.summary import render_summary
from exporters.traces import TraceLog, trace_line

__all__ = [
    "ProbeMetrics",
    "ResultBook",
    "TraceLog",
    "build_report",
    "make_metrics_app",
    "render_summary",
    "trace_line",
    "write_json",
]
