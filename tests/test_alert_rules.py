"""The Prometheus rules in deploy/prometheus: valid for promtool, their unit tests pass, and
they read only what fleetprobe exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from exposition import PROMETHEUS_SERIES, REPO, RULES, metric_names

RULE_TESTS = RULES.with_name("fleetprobe-rules.test.yml")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.needs_tool("promtool", "prometheus")
# A query inside an annotation template: {{ with printf `QUERY` $labels.x ... | query }}.
_TEMPLATE_QUERY = re.compile(r"printf\s+`([^`]*)`")


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
            found.append(query.replace("%q", '"x"').replace("%s", "x"))
    return found


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
