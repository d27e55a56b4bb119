"""MQTT brokers besides the session's Mosquitto, for the broker matrix: RabbitMQ's MQTT
plugin (Debian's rabbitmq-server), rumqttd (the ``iotcore`` package) and amqtt (3.1.1
only), each started on loopback and free ports with a configuration of its own."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from fleetprobe.testbed.mosquitto import free_ports

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # Debian's, without the su wrapper
_READY_S = 90.0  # RabbitMQ boots Erlang: ~13 s on an idle 2-core machine, more under load


def rabbitmq_path() -> str | None:
    """The rabbitmq-server start script, where Debian puts it."""
    return RABBITMQ_SERVER if Path(RABBITMQ_SERVER).exists() else shutil.which("rabbitmq-server")


def wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Return once ``host:port`` accepts connections; raise if ``process`` ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the broker exited with {process.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)  # polling a port: there is no event to wait on
    raise RuntimeError(f"nothing listened on {host}:{port} within {timeout_s:g}s")


class _BrokerProcess:
    """A broker subprocess in a session of its own (so that stopping it ends its children),
    with a temporary directory for its configuration and state."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"fleetprobe-{type(self).__name__.lower()}-"))
        self._process: subprocess.Popen[bytes] | None = None

    def _command(self) -> tuple[list[str], dict[str, str], int]:
        """The command line, its environment and the port that says it is ready."""
        raise NotImplementedError

    def start(self) -> _BrokerProcess:
        command, env, ready_port = self._command()
        log = (self.dir / "broker.log").open("wb")
        # stdin stays an open pipe until stop: a broker that reads it (rumqttd's launcher)
        # ends by itself if this process dies without stopping it.
        self._process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        try:
            wait_for_port(self.host, ready_port, self._process, _READY_S)
        except RuntimeError as error:
            tail = (self.dir / "broker.log").read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"{error}\n{tail}") from None
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            if process.stdin is not None:
                process.stdin.close()
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> _BrokerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RabbitMqProcess(_BrokerProcess):
    """A RabbitMQ node of its own (name, ports, state, Erlang cookie) with the MQTT plugin,
    anonymous MQTT access as ``guest``, every listener on loopback."""

    def __init__(self) -> None:
        super().__init__()
        self.amqp_port, self.mqtt_port, self.dist_port = free_ports(3)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.mqtt_port}"

    def _command(self) -> tuple[list[str], dict[str, str], int]:
        binary = rabbitmq_path()
        if binary is None:
            raise FileNotFoundError("rabbitmq-server is not installed (Debian: rabbitmq-server)")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.host}:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = {self.host}:{self.mqtt_port}\n"
            "mqtt.allow_anonymous = true\n"
            "loopback_users = none\n"
        )
        (self.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        env = {
            **os.environ,
            "HOME": str(self.dir),  # the Erlang cookie
            "RABBITMQ_NODENAME": f"fleetprobe-{self.mqtt_port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "ERL_EPMD_ADDRESS": self.host,
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        return [binary], env, self.mqtt_port


class RumqttdProcess(_BrokerProcess):
    """rumqttd (Rust) through the ``iotcore`` package: an MQTT 3.1.1 and an MQTT 5
    listener."""

    def __init__(self) -> None:
        super().__init__()
        self.port_311, self.port_5 = free_ports(2)

    def url(self, protocol: str) -> str:
        return f"mqtt://{self.host}:{self.port_5 if protocol == '5' else self.port_311}"

    def _command(self) -> tuple[list[str], dict[str, str], int]:
        listeners = ""
        for version, port in (("v4", self.port_311), ("v5", self.port_5)):
            listeners += (
                f'[{version}.1]\nname = "{version}"\nlisten = "{self.host}:{port}"\n'
                f"next_connection_delay_ms = 1\n[{version}.1.connections]\n"
                "connection_timeout_ms = 60000\nmax_payload_size = 1048576\n"
                "max_inflight_count = 100\ndynamic_filters = true\n\n"
            )
        config = self.dir / "rumqttd.toml"
        config.write_text(
            "id = 0\n[router]\nid = 0\nmax_connections = 10010\n"
            "max_outgoing_packet_count = 200\nmax_segment_size = 104857600\n"
            f"max_segment_count = 10\n\n{listeners}"
        )
        script = (
            "import sys, threading\n"
            "from iotcore.iotcore import IotCoreBroker\n"
            "broker = IotCoreBroker(config_path=sys.argv[1])\n"
            "threading.Thread(target=broker.run_forever, daemon=True).start()\n"
            "sys.stdin.read()\n"  # until the test session ends
        )
        return [sys.executable, "-c", script, str(config)], dict(os.environ), self.port_5


class AmqttProcess(_BrokerProcess):
    """amqtt, a Python MQTT 3.1.1 broker: it answers an MQTT 5 CONNECT in 3.1.1."""

    def __init__(self) -> None:
        super().__init__()
        [self.port] = free_ports(1)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _command(self) -> tuple[list[str], dict[str, str], int]:
        config = self.dir / "amqtt.yaml"
        config.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: {self.host}:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        amqtt = Path(sys.executable).with_name("amqtt")
        return [str(amqtt), "-c", str(config)], dict(os.environ), self.port
