"""Where results go: Prometheus metrics and /metrics, report.json, traces.jsonl, the summary."""

from fleetprobe.exporters.metrics import ProbeMetrics
from fleetprobe.exporters.report import build_report, write_json
from fleetprobe.exporters.results import ResultBook
from fleetprobe.exporters.server import make_metrics_app
from fleetprobe.exporters.summary import render_summary
from fleetprobe.exporters.traces import TraceLog, trace_line

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
