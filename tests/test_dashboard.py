"""The Grafana dashboard and its provisioning in deploy/grafana: valid JSON, every query
PromQL that reads only what fleetprobe exports, by the labels it exports them with, and
files that point at each other."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import promql_parser
import pytest
import yaml

from exposition import (
    REPO,
    RULES,
    LabelError,
    Series,
    exported_labels,
    metric_names,
    result_labels,
    with_recorded,
)

GRAFANA = REPO / "deploy/grafana"
DASHBOARD = GRAFANA / "fleetprobe.json"
DATASOURCES = GRAFANA / "provisioning/datasources/prometheus.yml"
PROVIDERS = GRAFANA / "provisioning/dashboards/fleetprobe.yml"
DASHBOARDS_DIR = "/var/lib/grafana/dashboards"  # where deploy/docker-compose.yml mounts it

# Grafana's own variables, with values that make valid PromQL where they are used.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
# $name, ${name}, ${name:format}, [[name]] (Grafana's variable syntaxes).
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")
_LABEL_VALUES = re.compile(r"^label_values\((?:(.+),)?\s*(\w+)\s*\)$", re.DOTALL)
_FORMAT_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")  # {{hop}} in a legend or a title
# Columns of a table panel that are not labels of its queries' results.
_NOT_A_LABEL = re.compile(r"^(Time|Value( #\w+)?)$")


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana reads it."""
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included."""
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)


def variables() -> list[dict[str, Any]]:
    """The dashboard's template variables."""
    found: list[dict[str, Any]] = dashboard()["templating"]["list"]
    return found


def queries() -> Iterator[tuple[str, str]]:
    """Every PromQL query with where it is: panel targets, annotations and variables (a
    variable's ``label_values(selector, label)`` yields its selector)."""
    board = dashboard()
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} ({panel['title']}) {target['refId']}", target["expr"]
    for annotation in board["annotations"]["list"]:
        if annotation.get("builtIn"):
            continue
        expr = annotation.get("expr") or annotation.get("target", {}).get("expr")
        yield f"annotation {annotation['name']}", expr
    for variable in variables():
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query if isinstance(query, str) else query["query"]
        match = _LABEL_VALUES.match(text.strip())
        assert match, f"variable {variable['name']}: not label_values(...): {text}"
        if match[1]:
            yield f"variable {variable['name']}", match[1]


def substituted(expr: str) -> str:
    """``expr`` with the dashboard's and Grafana's variables replaced by valid values;
    anything else that looks like a variable (``$1`` of label_replace) stays."""
    values = {**BUILTINS, **{v["name"]: "x" for v in variables()}}

    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        return values.get(name, match[0])

    return _VARIABLE.sub(value, expr)


def label_uses() -> Iterator[tuple[str, str | None, set[str]]]:
    """Every query with where it is and the labels of its result that the dashboard shows:
    a target's legend, the label columns its panel's transformations name (the targets of
    a table are merged on them, so each target needs all), an annotation's title, text and
    tags, a variable's label_values label."""
    board = dashboard()
    for panel in panels(board):
        columns: set[str] = set()
        for transformation in panel.get("transformations", []):
            for key in ("indexByName", "renameByName", "excludeByName"):
                columns |= set(transformation.get("options", {}).get(key, {}))
        columns = {column for column in columns if not _NOT_A_LABEL.match(column)}
        for target in panel.get("targets", []):
            shown = set(_FORMAT_LABEL.findall(target.get("legendFormat", "")))
            where = f"panel {panel['id']} ({panel['title']}) {target['refId']}"
            yield where, target["expr"], shown | columns
    for annotation in board["annotations"]["list"]:
        if annotation.get("builtIn"):
            continue
        formats = annotation.get("titleFormat", "") + annotation.get("textFormat", "")
        shown = set(_FORMAT_LABEL.findall(formats))
        shown |= {key.strip() for key in annotation.get("tagKeys", "").split(",") if key.strip()}
        yield f"annotation {annotation['name']}", annotation["expr"], shown
    for variable in variables():
        if variable["type"] == "query":
            query = variable["query"]
            text = query if isinstance(query, str) else query["query"]
            match = _LABEL_VALUES.match(text.strip())
            assert match, f"variable {variable['name']}: not label_values(...): {text}"
            yield f"variable {variable['name']}", match[1], {match[2]}  # selector may be None


def test_dashboard_is_json_with_unique_panel_ids() -> None:
    """The dashboard parses as JSON, has a uid and schema 39, and no two panels share an id."""
    board = dashboard()
    ids = [panel["id"] for panel in panels(board)]
    assert board["uid"] == "fleetprobe"
    assert board["schemaVersion"] == 39
    assert len(ids) == len(set(ids)) > 10


def test_every_query_is_promql() -> None:
    """Every query parses as PromQL once Grafana's variables are filled in."""
    found = list(queries())
    problems = {}
    for where, expr in found:
        try:
            promql_parser.parse(substituted(expr))
        except ValueError as error:
            problems[where] = f"{error}: {expr}"
    assert problems == {}
    assert len(found) > 20


def test_queries_read_only_what_fleetprobe_exports(exported_series: frozenset[str]) -> None:
    """Every metric a query reads is exported by a real run (or recorded by the rules)."""
    recorded = {
        rule["record"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    unknown = {}
    for where, expr in queries():
        if missing := metric_names(substituted(expr)) - exported_series - recorded:
            unknown[where] = sorted(missing)
    assert unknown == {}


@pytest.fixture(scope="module")
def known_labels(broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Series:
    """Labels of what the dashboard reads: a real run's series and what the rules record."""
    return with_recorded(exported_labels(broker_url, tmp_path_factory))


def test_queries_use_only_labels_their_series_have(known_labels: Series) -> None:
    """Every label a query, legend, annotation, variable or table column uses exists there."""
    # In a query: matchers, by/without, on/ignoring, label_replace, le; checked against a
    # real run's series. Shown of a result: legends, annotation titles, texts and tags,
    # label_values labels, table columns; checked against the query's result labels.
    problems = {}
    found = list(label_uses())
    for where, expr, shown in found:
        try:
            if expr is None:  # label_values(label): any series with the label
                labels = frozenset().union(*known_labels.values())
            else:
                labels = result_labels(substituted(expr), known_labels) or frozenset()
        except LabelError as error:
            problems[where] = str(error)
            continue
        if missing := shown - labels:
            problems[where] = f"{expr!r} yields {sorted(labels)}: no {sorted(missing)}"
    assert problems == {}
    assert {where for where, _ in queries()} <= {where for where, _, _ in found}  # all of them
    assert sum(len(shown) for _, _, shown in found) > 20


def test_only_defined_variables_are_used() -> None:
    """A ``$name`` in a query or a title is a variable of the dashboard or Grafana's own (a
    misspelt one would select nothing, silently)."""
    board = dashboard()
    defined = {v["name"] for v in variables()} | set(BUILTINS)
    texts = [expr for _, expr in queries()]
    texts += [panel["title"] for panel in panels(board)]
    texts += [f"${panel['repeat']}" for panel in panels(board) if "repeat" in panel]
    used = {
        next(group for group in match.groups() if group)
        for text in texts
        for match in _VARIABLE.finditer(text)
    }
    assert {name for name in used if not name.isdigit()} - defined == set()


def test_panels_and_variables_query_through_the_datasource_variable() -> None:
    """Every panel, target, query variable and annotation (but Grafana's built-in one) asks
    the data source chosen by ${datasource}."""
    board = dashboard()
    via_variable = {"type": "prometheus", "uid": "${datasource}"}
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == via_variable, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == via_variable, (panel["title"], target["refId"])
    for variable in variables():
        if variable["type"] == "query":
            assert variable["datasource"] == via_variable, variable["name"]
    for annotation in board["annotations"]["list"]:
        if not annotation.get("builtIn"):
            assert annotation["datasource"] == via_variable, annotation["name"]


def test_a_row_per_chain_and_fault_windows_as_annotations() -> None:
    """Chains are a row each (repeated by the multi-value `chain` variable, after
    `scenario`), and fault windows and hops down are annotations."""
    board = dashboard()
    by_name = {v["name"]: v for v in variables()}
    assert list(by_name) == ["datasource", "scenario", "chain"]  # each depends on the last
    assert by_name["chain"]["multi"] and by_name["chain"]["includeAll"]
    repeated = [p for p in panels(board) if p["type"] == "row" and p.get("repeat") == "chain"]
    assert len(repeated) == 1
    read = {
        annotation["name"]: metric_names(substituted(annotation["expr"]))
        for annotation in board["annotations"]["list"]
        if not annotation.get("builtIn")
    }
    assert read == {"Faults": {"fleetprobe_fault_active"}, "Hops down": {"fleetprobe_hop_up"}}


@pytest.mark.parametrize("path", [DATASOURCES, PROVIDERS], ids=lambda p: p.name)
def test_provisioning_files_are_grafana_v1(path: Any) -> None:
    """Both provisioning files are YAML of Grafana's provisioning format version 1."""
    assert yaml.safe_load(path.read_text())["apiVersion"] == 1


def test_provisioning_points_at_the_dashboard_and_its_datasource() -> None:
    """The dashboard's default data source is the provisioned one (same uid and type), and
    the dashboard provider reads the folder the dashboard is mounted into."""
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    chooser = next(v for v in variables() if v["name"] == "datasource")
    assert source["uid"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert chooser["type"] == "datasource"
    assert chooser["query"] == source["type"] == "prometheus"
    assert chooser["current"]["value"] == source["uid"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == DASHBOARDS_DIR
