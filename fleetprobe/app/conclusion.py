"""The end of a run: judge the objectives, set the exit code, write the reports and summary.

One process or several shard processes end the same way, from one :class:`ResultBook`
(for shards, the merge of theirs), so the objectives are always judged on the whole fleet.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from fleetprobe.app.exit_codes import ExitCode
from fleetprobe.app.objectives import Outcome, evaluate
from fleetprobe.app.outcomes import ExpectedOutcome
from fleetprobe.app.scenario.models import Scenario
from fleetprobe.exporters.junit import JudgedObjective, write_junit
from fleetprobe.exporters.report import build_report, write_json
from fleetprobe.exporters.results import ResultBook
from fleetprobe.exporters.saturation import summary_lines
from fleetprobe.exporters.summary import render_summary

log = logging.getLogger("fleetprobe")


@dataclass
class RunResult:
    """What a run ended with."""

    exit_code: int
    report: dict[str, Any]
    outcomes: list[Outcome] = field(default_factory=list)
    expectations: list[ExpectedOutcome] = field(default_factory=list)
    metrics_port: int | None = None
    record: RunRecord | None = None  # what was judged


@dataclass
class RunRecord:
    """What a run recorded, before it is judged."""

    run_id: str
    book: ResultBook
    started_at: str
    ended_at: str
    elapsed_s: float
    exit_code: int  # OK, or why the run could not be judged normally (128 + N: signal N)
    interrupted: bool
    health: list[dict[str, Any]]
    prober: dict[str, Any]
    mqtt: dict[str, Any]  # per role (fleet, observer): sessions, reconnects, outages
    started: bool = True  # whether emission began: a start that failed writes no reports
    output_errors: dict[str, str] = field(default_factory=dict)  # by output: why not written


def conclude(
    scenario: Scenario,
    record: RunRecord,
    result: RunResult,
    out: TextIO | None,
    *,
    sections: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> RunResult:
    """Judge ``record`` into ``result`` and write every report the scenario asks for.

    ``result.expectations`` (fault drills) are judged already; ``sections`` are more
    top-level keys of report.json, ``notes`` more lines of the summary.
    """
    result.record, result.exit_code = record, record.exit_code
    result.outcomes = evaluate(scenario.slo, record.book)
    judged: list[JudgedObjective] = [*result.outcomes, *result.expectations]
    if result.exit_code == ExitCode.OK and not all(o.ok for o in judged):
        failed = any(not o.ok and not o.inconclusive for o in judged)
        result.exit_code = ExitCode.OBJECTIVE_FAILED if failed else ExitCode.INCONCLUSIVE
    result.report = build_report(
        record.book,
        scenario=scenario.name,
        run_id=record.run_id,
        started_at=record.started_at,
        ended_at=record.ended_at,
        exit_code=result.exit_code,
        interrupted=record.interrupted,
        objectives=[o.as_dict() for o in result.outcomes],
        health=record.health,
    )
    result.report["prober"] = record.prober
    result.report["output_errors"] = record.output_errors  # the dict is filled in place
    result.report["mqtt"] = record.mqtt
    result.report.update(sections or {})
    if result.expectations:
        result.report["expectations"] = [e.as_dict() for e in result.expectations]
    if record.started or result.exit_code not in (ExitCode.BAD_SCENARIO, ExitCode.UNREACHABLE):
        _write_reports(scenario, record, result, judged)
    else:
        log.warning("the run did not start: the previous reports, if any, are left as they were")
    if out is not None:
        print(render_summary(record.book, scenario.name), file=out)
        for line in [*summary_lines(record.prober), *notes]:
            print(line, file=out)
        for outcome in judged:
            print(f"  {_verdict_word(outcome):<6}{outcome.explanation}", file=out)
    return result


def _verdict_word(outcome: JudgedObjective) -> str:
    return "ok" if outcome.ok else "?" if outcome.inconclusive else "FAIL"


def _write_reports(
    scenario: Scenario, record: RunRecord, result: RunResult, judged: list[JudgedObjective]
) -> None:
    """Write junit.xml, then report.json (which then tells whether the rest was written);
    an output that cannot be written is logged and kept in the report, never a crash, and
    makes an otherwise clean run exit 5."""
    exporters = scenario.exporters
    errors = record.output_errors
    if exporters.junit:
        try:
            write_junit(exporters.junit, scenario.name, judged, record.elapsed_s)
        except OSError as error:
            errors["junit"] = error.strerror or str(error)
    if errors and result.exit_code == ExitCode.OK:
        result.exit_code = result.report["exit_code"] = ExitCode.REPORTS_NOT_WRITTEN
    if exporters.json_path:
        try:
            write_json(exporters.json_path, result.report)
        except OSError as error:
            errors["json"] = error.strerror or str(error)
            if result.exit_code == ExitCode.OK:
                result.exit_code = ExitCode.REPORTS_NOT_WRITTEN
    for output, reason in errors.items():
        path = {"junit": exporters.junit, "json": exporters.json_path}.get(output)
        log.error("%s%s could not be written: %s", output, f" ({path})" if path else "", reason)
