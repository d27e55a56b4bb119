"""``report.json``: the run's results per chain and hop (the stable keys are in the docs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fleetprobe.core.results import COUNTED_RESULTS
from fleetprobe.exporters.files import write_atomically
from fleetprobe.exporters.results import ResultBook


def build_report(
    book: ResultBook,
    *,
    scenario: str,
    run_id: str,
    started_at: str,
    ended_at: str,
    exit_code: int,
    interrupted: bool = False,
    objectives: list[dict[str, Any]] | None = None,
    health: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The report as a JSON-ready dict."""
    zero_results = dict.fromkeys(COUNTED_RESULTS, 0)
    chains: dict[str, Any] = {}
    for chain in book.chains:
        chains[chain.spec.name] = {
            "followed": chain.followed,
            "ok": chain.verdicts["ok"],
            "failed": chain.verdicts["failed"],
            "aborted": chain.verdicts["aborted"],
            "inconclusive": chain.verdicts["inconclusive"],
            "unsent": chain.unsent,
            "not_followed": dict(chain.not_followed),
            "success_ratio": _ratio(chain.success_ratio),
            "failed_at": dict(chain.failed_at),
            "latency_s": chain.latency.summary(),
            "hops": {
                spec.name: {
                    "results": zero_results | dict(hop.results),
                    "latency_s": hop.latency.summary(),
                    "latency_unknown": len(hop.latency_late),
                    "step_s": hop.step.summary(),
                    "duplicates": hop.duplicates,
                    "unmatched": dict(hop.unmatched),
                    "errors": dict(hop.errors),
                    "success_ratio": _ratio(hop.success_ratio),
                }
                for spec, hop in zip(chain.spec.hops, chain.hops, strict=True)
            },
        }
    return {
        "scenario": scenario,
        "run_id": run_id,
        "started_at": started_at,
        "ended_at": ended_at,
        "exit_code": exit_code,
        "interrupted": interrupted,
        "signals": {
            name: {
                "sent": signal.sent,
                "send_errors": sum(signal.send_errors.values()),
                "send_errors_by_reason": dict(signal.send_errors),
            }
            for name, signal in book.signals.items()
        },
        "emission_lag_s": book.emission_lag.summary(),
        "chains": chains,
        "objectives": objectives or [],
        "health": health or [],
    }


def _ratio(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def write_json(path: str | Path, document: dict[str, Any]) -> None:
    """Write ``document`` to ``path``, replacing it atomically (see :func:`write_atomically`).

    Raises:
        OSError: it could not be written; the previous file is left as it was.
    """
    write_atomically(path, json.dumps(document, indent=2) + "\n")
