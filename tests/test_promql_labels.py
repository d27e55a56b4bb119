"""The label check of the deploy/ tests (exposition.result_labels) on small PromQL strings:
it names a label a query uses that what it reads does not have, and follows the labels a
query's result keeps."""

from __future__ import annotations

import pytest

from exposition import LabelError, Series, result_labels

TARGET = frozenset({"job", "instance"})
SERIES: Series = {
    "fleetprobe_hop_up": frozenset({"scenario", "chain", "hop"}) | TARGET,
    "fleetprobe_objective": frozenset({"scenario", "chain", "hop", "metric"}) | TARGET,
    "fleetprobe_hop_latency_seconds_bucket": frozenset({"scenario", "chain", "hop", "le"}) | TARGET,
    "fleetprobe_hop_latency_seconds_count": frozenset({"scenario", "chain", "hop"}) | TARGET,
    "fleetprobe_chain_results_total": frozenset({"scenario", "chain", "result", "failed_hop"})
    | TARGET,
    "up": TARGET,
}
HOP_UP = SERIES["fleetprobe_hop_up"]


@pytest.mark.parametrize(
    ("query", "wrong"),
    [
        ('fleetprobe_hop_up{hopp="broker"}', "hopp"),
        ('rate(fleetprobe_chain_results_total{resutl=~"ok|failed"}[5m])', "resutl"),
        ('{__name__="fleetprobe_hop_up", hopp="broker"}', "hopp"),
        ("sum by (hopp) (fleetprobe_hop_up)", "hopp"),
        ("sum without (hopp) (fleetprobe_hop_up)", "hopp"),
        ("topk by (hopp) (1, fleetprobe_hop_up)", "hopp"),
        ("sum by (hop) (max by (chain) (fleetprobe_hop_up))", "hop"),  # summed away inside
        ("min by (chain) (fleetprobe_hop_up) < on (chain, hop) fleetprobe_objective", "hop"),
        (
            "fleetprobe_hop_up < on (scenario, chain) max by (chain) (fleetprobe_objective)",
            "scenario",
        ),
        ("fleetprobe_hop_up / ignoring (hopp) fleetprobe_objective", "hopp"),
        (
            "fleetprobe_hop_up * on (chain) group_left (metric) max by (chain) "
            "(fleetprobe_objective)",
            "metric",
        ),
        (
            "max by (chain) (fleetprobe_objective) * on (chain) group_right (metricc) "
            "fleetprobe_hop_up",
            "metricc",
        ),
        ("fleetprobe_hop_up and on (job, instancee) up", "instancee"),
        (
            'label_replace(fleetprobe_chain_results_total, "hop", "$1", "failedhop", "(.+)")',
            "failedhop",
        ),
        (
            'label_join(fleetprobe_hop_up, "where", "/", "chain", "hopp")',
            "hopp",
        ),
        (
            "histogram_quantile(0.99, sum by (hop) "
            "(rate(fleetprobe_hop_latency_seconds_bucket[5m])))",
            "le",
        ),
        ("histogram_quantile(0.99, rate(fleetprobe_hop_latency_seconds_count[5m]))", "le"),
        ('absent(up{jobb="fleetprobe"})', "jobb"),
        ("sum(rate(fleetprobe_signals_sent_total[5m]))", "fleetprobe_signals_sent_total"),
    ],
)
def test_a_label_the_series_lacks_is_named(query: str, wrong: str) -> None:
    """A label the input lacks, anywhere in a query, raises LabelError naming it."""
    with pytest.raises(LabelError, match=f"'{wrong}'"):
        result_labels(query, SERIES)


@pytest.mark.parametrize(
    ("query", "labels"),
    [
        ('fleetprobe_hop_up{hop="broker", job="fleetprobe"}', HOP_UP),
        (
            "sum by (scenario, chain) (rate(fleetprobe_chain_results_total[5m]))",
            {"scenario", "chain"},
        ),
        ("sum without (job, instance) (fleetprobe_hop_up)", {"scenario", "chain", "hop"}),
        ("sum(fleetprobe_hop_up)", set()),
        ("topk(1, fleetprobe_hop_up)", HOP_UP),
        ('count_values("state", fleetprobe_hop_up)', {"state"}),
        ("1 - fleetprobe_hop_up == 0", HOP_UP),
        (
            "fleetprobe_hop_up < on (scenario, chain, hop) fleetprobe_objective",
            {"scenario", "chain", "hop"},
        ),
        ("fleetprobe_hop_up / ignoring (metric) fleetprobe_objective", HOP_UP),
        (
            "fleetprobe_hop_up * on (chain) group_left (metric) max by (chain, metric) "
            "(fleetprobe_objective)",
            HOP_UP | {"metric"},
        ),
        ("fleetprobe_hop_up and on (job, instance) up", HOP_UP),
        ("fleetprobe_hop_up or up", HOP_UP),
        (
            'label_replace(fleetprobe_chain_results_total, "hop", "$1", "failed_hop", "(.+)")',
            SERIES["fleetprobe_chain_results_total"] | {"hop"},
        ),
        (
            "histogram_quantile(0.99, sum by (hop, le) "
            "(rate(fleetprobe_hop_latency_seconds_bucket[5m])))",
            {"hop"},
        ),
        ('absent(up{job="fleetprobe"})', {"job"}),
        ("avg_over_time(fleetprobe_hop_up[5m:1m])", HOP_UP),
        ("vector(1)", set()),
        ("time()", None),
    ],
)
def test_the_labels_a_result_keeps(query: str, labels: set[str] | None) -> None:
    """Result labels follow PromQL's grouping, matching, label_replace and histogram rules."""
    assert result_labels(query, SERIES) == (None if labels is None else frozenset(labels))
