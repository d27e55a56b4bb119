"""The Prometheus rules in deploy/prometheus: valid for promtool, their unit tests pass, and
they read only what fleetprobe exports, by the labels it exports them with."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from exposition import (
    PROMETHEUS_SERIES,
    PROMETHEUS_SERIES_LABELS,
    REPO,
    RULES,
    LabelError,
    Series,
    exported_labels,
    metric_names,
    result_labels,
    with_recorded,
)

RULE_TESTS = RULES.with_name("fleetprobe-rules.test.yml")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.needs_tool("promtool", "prometheus")
# A query inside an annotation template: {{ with printf `QUERY` $labels.x ... | query }}.
_TEMPLATE_QUERY = re.compile(r"printf\s+`([^`]*)`")
# The same with what the template reads of the query's result, up to its {{ end }}.
_TEMPLATE_BLOCK = re.compile(r"printf\s+`([^`]*)`(.*?)\{\{-?\s*end\b", re.DOTALL)
_RESULT_LABEL = re.compile(r'\blabel\s+"(\w+)"')  # {{ ... | label "failed_hop" }}
_ALERT_LABEL = re.compile(r"\$labels\.(\w+)")  # {{ $labels.chain }}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool in the repository, bounded in time."""
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def rules() -> Iterator[dict[str, Any]]:
    """Every rule of the rules file."""
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        yield from group["rules"]


def alerts() -> list[dict[str, Any]]:
    """The alerting rules."""
    return [rule for rule in rules() if "alert" in rule]


def template_queries(rule: dict[str, Any]) -> list[str]:
    """The PromQL queries in a rule's annotation templates, with printf verbs filled in."""
    found = []
    for text in rule.get("annotations", {}).values():
        for query in _TEMPLATE_QUERY.findall(text):
            found.append(_filled(query))
    return found


def _filled(query: str) -> str:
    return query.replace("%q", '"x"').replace("%s", "x")


def rule_label_problems(rule: dict[str, Any], known: Series) -> list[str]:
    """Every label name ``rule`` uses that what it applies to lacks: in its expression, in
    its annotation templates' queries and in what they read of a result (``label "x"``),
    and every ``$labels.x`` of an alert's templates that the alert does not carry (its
    expression's result labels, its own labels and alertname)."""
    problems = []
    try:
        result = result_labels(rule["expr"], known)
    except LabelError as error:
        problems.append(str(error))
        result = None
    if "alert" in rule and result is not None:
        carried = result | set(rule.get("labels", {})) | {"alertname"}
        for text in [*rule.get("annotations", {}).values(), *rule.get("labels", {}).values()]:
            for name in _ALERT_LABEL.findall(text):
                if name not in carried:
                    problems.append(f"$labels.{name}: the alert carries only {sorted(carried)}")
    for text in rule.get("annotations", {}).values():
        for query, template in _TEMPLATE_BLOCK.findall(text):
            try:
                read = result_labels(_filled(query), known) or frozenset()
            except LabelError as error:
                problems.append(str(error))
                continue
            for name in _RESULT_LABEL.findall(template):
                if name not in read:
                    problems.append(f'label "{name}" of {query!r}: it yields only {sorted(read)}')
    return problems


@pytest.fixture(scope="module")
def known_labels(broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Series:
    """Labels of what rules read: a real run's series, `up`, and what the rules record."""
    exported = exported_labels(broker_url, tmp_path_factory)
    return with_recorded({**exported, **PROMETHEUS_SERIES_LABELS})


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    """`promtool check rules` accepts the rules file."""
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass() -> None:
    """`promtool test rules`: every expected alert fires with its labels and annotations,
    and no other."""
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert has a unit test where it fires and one where it does not."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {alert["alert"] for alert in alerts()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"


def test_every_alert_waits_and_has_a_severity() -> None:
    """Each alert has a `for:`, a severity, a summary and a description."""
    for alert in alerts():
        name = alert["alert"]
        assert alert.get("for"), name
        assert alert["labels"]["severity"] in {"critical", "warning"}, name
        assert set(alert["annotations"]) == {"summary", "description"}, name


def test_expected_annotations_name_where() -> None:
    """In every firing case of the unit tests, the description names each of the alert's
    scenario, chain, hop and instance, and the summary its chain and hop."""
    checked = 0
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            for expected in check.get("exp_alerts", []):
                labels, annotations = expected["exp_labels"], expected["exp_annotations"]
                for label in ("scenario", "chain", "hop", "instance"):
                    if label in labels:
                        assert labels[label] in annotations["description"], (check, label)
                        checked += 1
                for label in ("chain", "hop"):
                    if label in labels:
                        assert labels[label] in annotations["summary"], (check, label)
    assert checked > 0


def test_rules_read_only_what_fleetprobe_exports(exported_series: frozenset[str]) -> None:
    """Every metric the rules and their annotation queries read is exported by a real run,
    recorded by the file itself, or Prometheus' own `up`."""
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    known = exported_series | recorded | PROMETHEUS_SERIES
    unknown = {}
    for rule in rules():
        name = rule.get("alert") or rule["record"]
        for expr in (rule["expr"], *template_queries(rule)):
            if missing := metric_names(expr) - known:
                unknown[name] = sorted(missing)
    assert unknown == {}
    assert any(template_queries(rule) for rule in rules()), "the query pattern finds nothing"


def test_recording_rules_are_used() -> None:
    """Every recording rule is read by an alert (the dashboard reads raw metrics)."""
    read = set()
    for alert in alerts():
        for expr in (alert["expr"], *template_queries(alert)):
            read |= metric_names(expr)
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    assert recorded - read == set()


def test_rules_use_only_labels_their_series_have(known_labels: Series) -> None:
    """Every label a rule, its annotation queries and its $labels use exists where it reads."""
    # Matchers, by/without, on/ignoring, group_left/right, le of histogram_quantile, what a
    # template reads of a query's result, $labels.x of an alert; against a real run's
    # series and the labels each recording rule keeps.
    problems = {
        rule.get("alert") or rule["record"]: found
        for rule in rules()
        if (found := rule_label_problems(rule, known_labels))
    }
    assert problems == {}
    texts = [text for rule in rules() for text in rule.get("annotations", {}).values()]
    blocks = sum(len(_TEMPLATE_BLOCK.findall(text)) for text in texts)
    assert blocks == sum(len(template_queries(rule)) for rule in rules()) > 0  # none escapes
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    assert recorded <= set(known_labels)  # every recording rule passed and is known


KNOWN: Series = {
    "fleetprobe_hop_up": frozenset({"scenario", "chain", "hop", "job", "instance"}),
    "fleetprobe_chain_results_total": frozenset(
        {"scenario", "chain", "result", "failed_hop", "job", "instance"}
    ),
    "scenario_chain_failed_hop:fleetprobe_chain_failed:rate5m": frozenset(
        {"scenario", "chain", "failed_hop"}
    ),
}


def alert(expr: str, summary: str, description: str = "") -> dict[str, Any]:
    """An alerting rule as the rules file writes one."""
    return {
        "alert": "Test",
        "expr": expr,
        "labels": {"severity": "critical"},
        "annotations": {"summary": summary, "description": description},
    }


def _in_expr(label: str) -> dict[str, Any]:
    return alert(f"min by (chain, {label}) (fleetprobe_hop_up) == 0", "{{ $labels.chain }}")


def _in_alert_template(label: str) -> dict[str, Any]:
    return alert("min by (chain) (fleetprobe_hop_up) == 0", f"{{{{ $labels.{label} }}}}")


def _in_annotation_query(label: str) -> dict[str, Any]:
    query = f"topk(1, fleetprobe_chain_results_total{{{label}=%q}})"
    template = f"{{{{ with printf `{query}` $labels.chain | query }}}}{{{{ end }}}}"
    return alert("fleetprobe_hop_up == 0", "x", template)


def _in_annotation_result(label: str) -> dict[str, Any]:
    query = "topk(1, scenario_chain_failed_hop:fleetprobe_chain_failed:rate5m{chain=%q})"
    template = (
        f"{{{{ with printf `{query}` $labels.chain | query }}}}"
        f'{{{{ . | first | label "{label}" }}}}{{{{ end }}}}'
    )
    return alert("fleetprobe_hop_up == 0", "x", template)


@pytest.mark.parametrize(
    ("rule", "right", "wrong"),
    [
        (_in_expr, "hop", "hopp"),
        (_in_alert_template, "chain", "hop"),  # summed away by the expression
        (_in_annotation_query, "chain", "chainn"),
        (_in_annotation_result, "failed_hop", "failed_hopp"),
    ],
    ids=["expr", "alert-template", "annotation-query", "annotation-result"],
)
def test_the_rule_check_names_a_wrong_label(
    rule: Callable[[str], dict[str, Any]], right: str, wrong: str
) -> None:
    """A wrong label in a rule's expression, templates or annotation queries is named."""
    assert rule_label_problems(rule(right), KNOWN) == []
    problems = rule_label_problems(rule(wrong), KNOWN)
    assert len(problems) == 1 and wrong in problems[0], problems
