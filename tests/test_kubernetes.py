"""deploy/kubernetes/: the manifests against the API's schemas, and the shards against the CLI."""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from conftest import REPO
from fleetprobe.app import cli
from fleetprobe.app.scenario import load_scenario
from fleetprobe.transport.servers import split_listen

KUBERNETES = REPO / "deploy/kubernetes"
# The oldest Kubernetes the Job is for (backoffLimitPerIndex is on by default from 1.29),
# and the newest whose schema the validator ships.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
INDEX = "JOB_COMPLETION_INDEX"
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def load(name: str) -> list[dict[str, Any]]:
    """The documents of a manifest file."""
    return [doc for doc in yaml.safe_load_all((KUBERNETES / name).read_text()) if doc]


def kustomization() -> dict[str, Any]:
    """deploy/kubernetes/kustomization.yaml."""
    (doc,) = load("kustomization.yaml")
    return doc


def generated_config_maps() -> list[dict[str, Any]]:
    """The ConfigMaps of the configMapGenerator, as kustomize makes them (without the hash
    suffix it adds to the name and to every reference)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": generator["name"]},
            "data": {Path(f).name: (KUBERNETES / f).read_text() for f in generator["files"]},
        }
        for generator in kustomization()["configMapGenerator"]
    ]


def job() -> dict[str, Any]:
    """The Job of the kustomization."""
    (doc,) = load("job.yaml")
    assert doc["kind"] == "Job"
    return doc


def container() -> dict[str, Any]:
    """The Job's one container."""
    (only,) = job()["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = only
    return result


def shards() -> int:
    """N in the container's ``--shard I/N``."""
    args = container()["args"]
    index, count = args[args.index("--shard") + 1].split("/")
    assert index == f"$({INDEX})"
    return int(count)


def shard_args(index: int) -> list[str]:
    """The container's arguments as Kubernetes expands them in the pod of ``index``."""
    return [arg.replace(f"$({INDEX})", str(index)) for arg in container()["args"]]


def pod_labels() -> dict[str, str]:
    """The labels of the Job's pods."""
    labels: dict[str, str] = job()["spec"]["template"]["metadata"]["labels"]
    return labels


def port_names() -> dict[str, int]:
    """The container's named ports."""
    return {port["name"]: port["containerPort"] for port in container()["ports"]}


def manifests() -> list[dict[str, Any]]:
    """Everything the kustomization applies, and the PodMonitor left for operator users."""
    resources = [doc for name in kustomization()["resources"] for doc in load(name)]
    return resources + generated_config_maps()


def test_the_kustomization_names_files_that_exist() -> None:
    """Every resource and generator file of kustomization.yaml exists beside it."""
    files = [*kustomization()["resources"]]
    files += [f for g in kustomization()["configMapGenerator"] for f in g["files"]]
    files.append("podmonitor.yaml")  # applied by hand by prometheus-operator users
    for name in files:
        assert (KUBERNETES / name).is_file(), name


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "manifest", manifests(), ids=lambda m: f"{m['kind']}/{m['metadata']['name']}"
)
def test_the_manifests_pass_the_kubernetes_schemas(manifest: dict[str, Any], version: str) -> None:
    """Job, Service and the generated ConfigMap are valid, unknown fields refused."""
    kubernetes_validate.validate(manifest, version, strict=True)


def test_the_validator_refuses_an_unknown_field() -> None:
    """A misspelt field fails the strict schema (so the test above can fail)."""
    broken = job()
    broken["spec"]["completion"] = broken["spec"].pop("completions")
    with pytest.raises(kubernetes_validate.ValidationError, match="'completion' was unexpected"):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_the_job_runs_one_pod_per_shard_at_once() -> None:
    """Indexed, with completions == parallelism == the N of --shard I/N."""
    spec = job()["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == shards() > 1
    # podFailurePolicy works only with pods that are not restarted in place.
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_every_shard_parses_with_fleetprobes_parser() -> None:
    """Pod I's arguments, $(JOB_COMPLETION_INDEX) expanded, run shard I/N with /metrics
    on every interface at the container's metrics port."""
    count = shards()
    for index in range(count):
        args: argparse.Namespace = cli._parser().parse_args(shard_args(index))
        assert args.command is cli._run
        assert args.shard == (index, count)
        host, port = split_listen(args.metrics_listen)
        assert host == "0.0.0.0" and port == port_names()["metrics"]


def test_arguments_use_only_variables_the_container_declares() -> None:
    """Kubernetes expands $(NAME) only for env of the container; the index comes from the
    completion-index annotation."""
    env = {var["name"]: var for var in container()["env"]}
    for arg in container()["args"]:
        for name in REFERENCE.findall(arg):
            assert name in env, name
    assert env[INDEX]["valueFrom"]["fieldRef"]["fieldPath"] == INDEX_ANNOTATION
    assert "command" not in container()  # the image's entrypoint, `fleetprobe`


def mounted_file(path: str) -> tuple[dict[str, Any], str]:
    """The volume that shows ``path`` in the container, and the file's name within it."""
    volumes = {v["name"]: v for v in job()["spec"]["template"]["spec"]["volumes"]}
    for mount in container()["volumeMounts"]:
        if PurePosixPath(path).is_relative_to(mount["mountPath"]):
            return volumes[mount["name"]], str(PurePosixPath(path).relative_to(mount["mountPath"]))
    raise AssertionError(f"nothing is mounted at {path}")


def test_the_scenario_is_the_generated_config_map() -> None:
    """The scenario path in the arguments is a key of the ConfigMap the generator makes."""
    volume, key = mounted_file(shard_args(0)[1])
    (config_map,) = generated_config_maps()
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert key in config_map["data"]


def test_the_scenario_passes_fleetprobe_validate_in_the_job_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`fleetprobe validate` accepts the scenario with the env of the Job's container (the
    optional secrets unset), as mounted in the pod."""
    for name in os.environ:
        if name.startswith("FLEET"):
            monkeypatch.delenv(name)
    for var in container()["env"]:
        if "value" in var:
            monkeypatch.setenv(var["name"], var["value"])
        else:
            source = var["valueFrom"]
            assert "fieldRef" in source or source["secretKeyRef"]["optional"] is True, var
    _, key = mounted_file(shard_args(0)[1])
    (config_map,) = generated_config_maps()
    path = tmp_path / key
    path.write_text(config_map["data"][key])
    assert cli.main(["validate", str(path)]) == 0


def test_the_scenario_suits_shards_on_a_read_only_filesystem() -> None:
    """No report files (the root filesystem is read-only) and no webhook hop (the platform
    cannot tell which shard's pod should receive a call)."""
    environ = {var["name"]: var["value"] for var in container()["env"] if "value" in var}
    scenario = load_scenario(KUBERNETES / "scenario.yaml", environ).scenario
    exporters = scenario.exporters
    assert exporters.json_path is exporters.junit is exporters.traces is None
    assert all(hop.kind[0] != "webhook" for chain in scenario.chains for hop in chain.hops)


def dockerfile_uid() -> int:
    """The uid of the user the image runs as."""
    found = re.search(r"useradd .*--uid (\d+)", (REPO / "Dockerfile").read_text())
    assert found
    return int(found[1])


def test_the_pod_runs_unprivileged_with_bounded_resources() -> None:
    """Non-root (the image's uid, which the kubelet can check), read-only root, no
    capabilities, no privilege escalation, requests and limits for CPU and memory."""
    pod = job()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid() != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    resources = container()["resources"]
    for kind in ("requests", "limits"):
        assert set(resources[kind]) == {"cpu", "memory"}, kind


def test_the_image_is_pinned_to_the_project_version() -> None:
    """The Job runs the image of this version, not a moving tag."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert container()["image"] == f"fleetprobe:{version}"


def test_the_headless_service_selects_the_shard_pods() -> None:
    """Headless, its selector matches the pod template, its port is the metrics port, and
    it is the pods' subdomain."""
    (service,) = load("service.yaml")
    spec = service["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["selector"].items() <= pod_labels().items()
    (port,) = spec["ports"]
    assert port["targetPort"] in port_names()
    assert port["port"] == port_names()[port["targetPort"]]
    assert job()["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]


def test_the_podmonitor_scrapes_every_shard_pod() -> None:
    """The PodMonitor (a CRD, checked by hand) selects the Job's pods and scrapes the
    container's named metrics port."""
    (monitor,) = load("podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "PodMonitor"
    spec = monitor["spec"]
    assert set(spec) == {"selector", "podMetricsEndpoints"}
    assert set(spec["selector"]) == {"matchLabels"}
    assert spec["selector"]["matchLabels"].items() <= pod_labels().items()
    assert spec["podMetricsEndpoints"]
    for endpoint in spec["podMetricsEndpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["port"] in port_names()
        assert endpoint["path"] == "/metrics"
