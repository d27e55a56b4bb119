"""deploy/docker-compose.yml and what it mounts: checked without Docker, and run on loopback.

Docker is not needed: the structure is read from the compose file, the configs go through
the tools of their own projects (promtool, amtool, mosquitto), the commands through
fleetprobe's own parser, and the broker, testbed and fleetprobe services run as local
processes with their own configs and commands, their addresses moved to loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from conftest import REPO, finish, fleetprobe
from fleetprobe.app import cli
from fleetprobe.app.scenario import load_scenario
from fleetprobe.app.scenario.models import Scenario
from fleetprobe.testbed import cli as testbed_cli
from fleetprobe.testbed.mosquitto import free_ports, mosquitto_path
from fleetprobe.transport.servers import split_listen

DEPLOY = REPO / "deploy"
SERVICES = {"mosquitto", "testbed", "fleetprobe", "prometheus", "alertmanager", "grafana"}
# The keys this stack uses; anything else is more likely a typo than a feature.
SERVICE_KEYS = {
    "build",
    "image",
    "command",
    "environment",
    "volumes",
    "ports",
    "healthcheck",
    "depends_on",
    "restart",
}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
# Inside the container: where each image reads its config, and its own default port.
MOSQUITTO_CONF = "/mosquitto/config/mosquitto.conf"
PROMETHEUS_PORT, ALERTMANAGER_PORT = 9090, 9093


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    """The services of the compose file, YAML anchors and merge keys resolved."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def project_version() -> str:
    """The version in pyproject.toml."""
    version: str = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return version


def mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(source, target) of each volume of a service (short syntax)."""
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        yield source, target


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """The file in the repository that a bind mount of ``service`` shows at ``container_path``."""
    wanted = PurePosixPath(container_path)
    for source, target in mounts(service):
        if source.startswith(".") and wanted.is_relative_to(target):
            return DEPLOY / source / wanted.relative_to(target)
    raise AssertionError(f"no bind mount of the service shows {container_path}")


def environment(service: dict[str, Any]) -> dict[str, str]:
    """The environment a service's container gets, as strings."""
    return {name: str(value) for name, value in service.get("environment", {}).items()}


def parse(service: dict[str, Any]) -> argparse.Namespace:
    """The service's command, parsed by fleetprobe's own parser (the image's entrypoint)."""
    return cli._parser().parse_args(service["command"])


def published(service: dict[str, Any]) -> dict[int, str]:
    """Container port to the host address it is published on."""
    result = {}
    for binding in service.get("ports", []):
        host, host_port, container_port = binding.rsplit(":", 2)
        result[int(container_port)] = f"{host}:{host_port}"
    return result


def mosquitto_port() -> int:
    """The port of the broker's listener, from its config."""
    conf = (DEPLOY / "mosquitto/mosquitto.conf").read_text()
    found = re.search(r"^listener (\d+)$", conf, re.MULTILINE)
    assert found, "mosquitto.conf has no `listener PORT` line"
    return int(found[1])


def stack_scenario(services: dict[str, dict[str, Any]]) -> Scenario:
    """The scenario the fleetprobe service runs, with that service's environment."""
    service = services["fleetprobe"]
    path = host_path(service, parse(service).scenario)
    return load_scenario(path, environment(service)).scenario


def test_the_stack_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    """Broker, testbed, fleetprobe, Prometheus, Alertmanager and Grafana, nothing else."""
    assert set(services) == SERVICES


def test_services_use_only_known_keys(services: dict[str, dict[str, Any]]) -> None:
    """No service has a key outside those the stack means to use (a typo is not ignored)."""
    for name, service in services.items():
        assert set(service) <= SERVICE_KEYS, (name, set(service) - SERVICE_KEYS)


def test_every_image_is_pinned_to_a_version(services: dict[str, dict[str, Any]]) -> None:
    """Every image names an exact version; fleetprobe's own is tagged with the project's."""
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), (name, image)
    for name in ("testbed", "fleetprobe"):
        assert services[name]["image"] == f"fleetprobe:{project_version()}"
        assert (DEPLOY / services[name]["build"]["context"] / "Dockerfile").is_file()


def test_every_published_port_is_on_loopback(services: dict[str, dict[str, Any]]) -> None:
    """Ports are published on 127.0.0.1 only: the demo's anonymous access stays local."""
    for name, service in services.items():
        for binding in service.get("ports", []):
            assert isinstance(binding, str) and binding.startswith("127.0.0.1:"), (name, binding)
            assert len(binding.split(":")) == 3, (name, binding)


def test_every_bind_mount_exists_in_the_repository(services: dict[str, dict[str, Any]]) -> None:
    """Each host path mounted into a container exists (relative to deploy/)."""
    missing = [
        f"{name}: {source}"
        for name, service in services.items()
        for source, _ in mounts(service)
        if source.startswith(".") and not (DEPLOY / source).exists()
    ]
    assert not missing


def test_named_volumes_are_declared() -> None:
    """A volume that is not a path is declared at the top level of the compose file."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    declared = set(compose.get("volumes") or {})
    for service in compose["services"].values():
        for source, _ in mounts(service):
            if not source.startswith((".", "/")):
                assert source in declared, source


def test_services_wait_for_healthy_dependencies(services: dict[str, dict[str, Any]]) -> None:
    """Every service has a healthcheck; depends_on names services with a condition."""
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        for dependency, how in service.get("depends_on", {}).items():
            assert dependency in SERVICES and dependency != name, (name, dependency)
            assert how["condition"] in CONDITIONS, (name, dependency)
    assert set(services["fleetprobe"]["depends_on"]) == {"mosquitto", "testbed"}
    assert set(services["testbed"]["depends_on"]) == {"mosquitto"}


@pytest.mark.parametrize(("name", "command"), [("testbed", "run"), ("fleetprobe", "_run")])
def test_the_commands_parse_with_fleetprobes_parser(
    services: dict[str, dict[str, Any]], name: str, command: str
) -> None:
    """The testbed and fleetprobe commands are valid `fleetprobe testbed` / `run` arguments."""
    args = parse(services[name])
    owner = testbed_cli if name == "testbed" else cli
    assert args.command is getattr(owner, command)


def test_the_stack_scenario_passes_fleetprobe_validate(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fleetprobe validate` accepts the scenario the fleetprobe service runs, in its env."""
    service = services["fleetprobe"]
    for name in os.environ:
        if name.startswith("FLEET"):  # only what the compose file sets
            monkeypatch.delenv(name)
    for name, value in environment(service).items():
        monkeypatch.setenv(name, value)
    path = host_path(service, parse(service).scenario)
    assert path.is_file()
    assert cli.main(["validate", str(path)]) == 0


def test_the_services_find_each_other(services: dict[str, dict[str, Any]]) -> None:
    """Broker, state API, webhook and /metrics addresses agree across services and Prometheus."""
    scenario = stack_scenario(services)
    run, testbed = parse(services["fleetprobe"]), parse(services["testbed"])
    broker = f"mqtt://mosquitto:{mosquitto_port()}"
    assert scenario.target.mqtt.url == testbed.mqtt == broker
    assert mosquitto_port() in published(services["mosquitto"])

    http_host, http_port = split_listen(testbed.http)
    assert http_host == "0.0.0.0" and http_port in published(services["testbed"])
    receiver_host, receiver_port = split_listen(scenario.exporters.webhook_receiver.listen)
    assert receiver_host == "0.0.0.0"
    secret = environment(services["testbed"])[testbed.webhook_secret_env]
    webhooks = {url: signals for signals, url in testbed.webhook}
    kinds = set()
    for chain in scenario.chains:
        for hop in chain.hops:
            kind, config = hop.kind
            kinds.add(kind)
            if kind == "http_poll":
                assert config.url.startswith(f"http://testbed:{http_port}/"), config.url
            if kind == "webhook":
                url = f"http://fleetprobe:{receiver_port}{config.path}"
                assert url in webhooks, (url, list(webhooks))
                assert webhooks[url] is None or chain.signal in webhooks[url]
                assert config.secret is not None and config.secret.get_secret_value() == secret
    assert kinds == {"mqtt", "http_poll", "webhook"}  # every hop kind is in the stack

    metrics_host, metrics_port = split_listen(run.metrics_listen)
    assert metrics_host == "0.0.0.0" and metrics_port in published(services["fleetprobe"])
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    (job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "fleetprobe"]
    assert job["scrape_interval"] == "5s"
    assert job["static_configs"] == [{"targets": [f"fleetprobe:{metrics_port}"]}]
    (alertmanagers,) = prometheus["alerting"]["alertmanagers"]
    assert alertmanagers["static_configs"] == [{"targets": [f"alertmanager:{ALERTMANAGER_PORT}"]}]


def test_the_stack_scenario_runs_long_and_writes_no_files(
    services: dict[str, dict[str, Any]],
) -> None:
    """A run lasts at least an hour, restarted when it ends, and leaves no files to pile up."""
    scenario = stack_scenario(services)
    assert scenario.duration >= 3600
    assert services["fleetprobe"]["restart"] == "unless-stopped"
    assert "--duration" not in services["fleetprobe"]["command"]
    exporters = scenario.exporters
    assert exporters.json_path is exporters.junit is exporters.traces is None


def test_the_broker_config_is_the_one_mosquitto_reads(services: dict[str, dict[str, Any]]) -> None:
    """mosquitto.conf is mounted where the image reads it: anonymous demo, TCP_NODELAY on."""
    assert host_path(services["mosquitto"], MOSQUITTO_CONF) == DEPLOY / "mosquitto/mosquitto.conf"
    lines = set((DEPLOY / "mosquitto/mosquitto.conf").read_text().splitlines())
    assert {"allow_anonymous true", "set_tcp_nodelay true"} <= lines


def prometheus_flag(services: dict[str, dict[str, Any]], service: str, flag: str) -> str:
    """The value of ``--flag=VALUE`` in a service's command."""
    (value,) = [a.split("=", 1)[1] for a in services[service]["command"] if a.startswith(flag)]
    return value


def test_prometheus_reads_the_config_and_rules_of_the_repository(
    services: dict[str, dict[str, Any]],
) -> None:
    """Prometheus' config file and each rule file it names are mounted from deploy/prometheus."""
    prometheus = services["prometheus"]
    config_file = prometheus_flag(services, "prometheus", "--config.file")
    assert host_path(prometheus, config_file) == DEPLOY / "prometheus/prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert config["rule_files"]
    for rule_file in config["rule_files"]:
        # Relative, so that promtool resolves it in the repository as Prometheus does in
        # the container (both against the config file's folder).
        assert not rule_file.startswith("/"), rule_file
        in_container = str(PurePosixPath(config_file).parent / rule_file)
        assert host_path(prometheus, in_container) == DEPLOY / "prometheus" / rule_file
    assert "fleetprobe-rules.yml" in config["rule_files"]
    assert PROMETHEUS_PORT in published(prometheus)


@pytest.mark.needs_tool("promtool", "prometheus")
def test_prometheus_config_passes_promtool() -> None:
    """`promtool check config` accepts prometheus.yml and the rule files it names."""
    result = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus/prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_reads_the_config_of_the_repository(
    services: dict[str, dict[str, Any]],
) -> None:
    """Alertmanager's --config.file is alertmanager.yml of the repository; it has a default."""
    config_file = prometheus_flag(services, "alertmanager", "--config.file")
    path = host_path(services["alertmanager"], config_file)
    assert path == DEPLOY / "alertmanager/alertmanager.yml"
    config = yaml.safe_load(path.read_text())
    assert config["route"]["receiver"] in {r["name"] for r in config["receivers"]}
    assert ALERTMANAGER_PORT in published(services["alertmanager"])


@pytest.mark.needs_tool("amtool", "prometheus-alertmanager")
def test_alertmanager_config_passes_amtool() -> None:
    """`amtool check-config` accepts alertmanager.yml."""
    result = subprocess.run(
        ["amtool", "check-config", str(DEPLOY / "alertmanager/alertmanager.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_shows_the_dashboard_from_prometheus(services: dict[str, dict[str, Any]]) -> None:
    """The provisioned data source is the stack's Prometheus; the dashboard is where the
    provider reads and is the home page; anonymous visitors may only view."""
    grafana = services["grafana"]
    env = environment(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning == DEPLOY / "grafana/provisioning"

    (datasources,) = (provisioning / "datasources").glob("*.yml")
    (source,) = yaml.safe_load(datasources.read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == f"http://prometheus:{PROMETHEUS_PORT}"

    (dashboards,) = (provisioning / "dashboards").glob("*.yml")
    (provider,) = yaml.safe_load(dashboards.read_text())["providers"]
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert str(PurePosixPath(home).parent) == provider["options"]["path"]
    assert host_path(grafana, home) == DEPLOY / "grafana/fleetprobe.json"


class LoopbackPorts:
    """Moves the compose network to loopback: each `service:port` gets a free local port."""

    ADDRESS = re.compile(r"\b(?P<host>0\.0\.0\.0|[a-z][a-z0-9-]*):(?P<port>\d+)\b")

    def __init__(self, texts: dict[str, list[str]]) -> None:
        keys = sorted(
            {
                (self._owner(service, match["host"]), int(match["port"]))
                for service, strings in texts.items()
                for text in strings
                for match in self.ADDRESS.finditer(text)
                if self._owner(service, match["host"]) in SERVICES
            }
        )
        self.ports = dict(zip(keys, free_ports(len(keys)), strict=True))

    @staticmethod
    def _owner(service: str, host: str) -> str:
        return service if host == "0.0.0.0" else host

    def move(self, service: str, text: str) -> str:
        """``text`` of ``service`` with each address of a compose service on loopback."""

        def swap(match: re.Match[str]) -> str:
            owner = self._owner(service, match["host"])
            if owner not in SERVICES:
                return match[0]
            return f"127.0.0.1:{self.ports[owner, int(match['port'])]}"

        return self.ADDRESS.sub(swap, text)


async def wait_for_port(port: int, timeout_s: float = 10) -> None:
    """Return once something accepts TCP connections on 127.0.0.1:``port``."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.02)  # polling a port: there is no event to wait on
                continue
            writer.close()
            await writer.wait_closed()
            return


async def stop(process: asyncio.subprocess.Process, signum: int) -> None:
    """Stop a subprocess with ``signum`` (kill it if it lingers) and reap it."""
    if process.returncode is None:
        process.send_signal(signum)
        try:
            async with asyncio.timeout(10):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest.mark.needs_tool("mosquitto", "mosquitto")
async def test_the_stack_follows_every_hop_on_loopback(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """mosquitto.conf, the testbed's and fleetprobe's commands and environment, run as local
    processes with the addresses on loopback: every objective of the stack scenario is met."""
    mosquitto_conf = (DEPLOY / "mosquitto/mosquitto.conf").read_text()
    texts = {
        name: [*services[name]["command"], *environment(services[name]).values()]
        for name in ("testbed", "fleetprobe")
    }
    texts["mosquitto"] = [f"0.0.0.0:{mosquitto_port()}"]
    ports = LoopbackPorts(texts)
    broker_port = ports.ports["mosquitto", mosquitto_port()]
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        re.sub(r"^listener \d+$", f"listener {broker_port} 127.0.0.1", mosquitto_conf, flags=re.M)
    )

    def moved(name: str) -> tuple[list[str], dict[str, str]]:
        command = [ports.move(name, arg) for arg in services[name]["command"]]
        env = {k: ports.move(name, v) for k, v in environment(services[name]).items()}
        return command, env

    broker = await asyncio.create_subprocess_exec(
        str(mosquitto_path()),
        "-c",
        str(conf),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    testbed: asyncio.subprocess.Process | None = None
    draining: list[asyncio.Task[bytes]] = []
    try:
        await wait_for_port(broker_port)
        command, env = moved("testbed")
        testbed = await fleetprobe(*command, cwd=tmp_path, env=env)
        assert testbed.stderr is not None
        async with asyncio.timeout(20):  # its log says when it listens
            while b"state API and control on" not in (line := await testbed.stderr.readline()):
                assert line, "the testbed exited before it was ready"
        # Keep reading what it writes, so that a full pipe never blocks it.
        assert testbed.stdout is not None
        draining = [asyncio.create_task(s.read()) for s in (testbed.stdout, testbed.stderr)]

        command, env = moved("fleetprobe")
        scenario = host_path(services["fleetprobe"], parse(services["fleetprobe"]).scenario)
        command[command.index(parse(services["fleetprobe"]).scenario)] = str(scenario)
        run = await fleetprobe(*command, "--duration", "2s", cwd=tmp_path, env=env)
        code, out, err = await finish(run, 60)
    finally:
        if testbed is not None:
            await stop(testbed, signal.SIGINT)
            for task in draining:
                await task
        await stop(broker, signal.SIGTERM)
    assert code == 0, out + err
    for chain in ("telemetry-to-api", "door-to-broker"):
        assert re.search(rf"chain {chain} .*, failed 0,", out), out


def test_loopback_ports_move_only_compose_addresses() -> None:
    """Service addresses and 0.0.0.0 listeners move to loopback; other text stays."""
    ports = LoopbackPorts({"testbed": ["mqtt://mosquitto:1883", "0.0.0.0:8080"]})
    broker, http = ports.ports["mosquitto", 1883], ports.ports["testbed", 8080]
    assert ports.move("testbed", "mqtt://mosquitto:1883") == f"mqtt://127.0.0.1:{broker}"
    assert ports.move("testbed", "0.0.0.0:8080") == f"127.0.0.1:{http}"
    assert ports.move("testbed", "telemetry=http://example.org:80/x") == (
        "telemetry=http://example.org:80/x"
    )
    assert urlsplit(ports.move("testbed", "http://mosquitto:1883")).port == broker
