"""Start a private Mosquitto broker on loopback, for the demo and the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

READY_TIMEOUT_S = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` different TCP ports that were free a moment ago.

    The probes stay bound until all are picked: two calls of :func:`free_port` in a row
    may well return the same port, since the first probe is closed before the second.
    """
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind((host, 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def mosquitto_path() -> str | None:
    """The mosquitto binary, looking where Debian installs it too (often not on PATH)."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


class MosquittoProcess:
    """A mosquitto subprocess with its own config: 127.0.0.1, a free port, anonymous access.

    ``listener_options`` are lines added to the listener (``cafile``, ``certfile``, ... for TLS).
    ``users`` (name to password) turns anonymous access off and lets only them in.
    ``persistence_dir`` keeps the broker's state there across a stop and a start.

    ``set_tcp_nodelay`` is on: without it the broker's small writes wait for Nagle's
    algorithm and p99.9 latency jumps to ~40 ms on loopback.
    """

    def __init__(
        self,
        binary: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        listener_options: str = "",
        users: dict[str, str] | None = None,
        persistence_dir: Path | None = None,
    ) -> None:
        found = binary or mosquitto_path()
        if found is None:
            raise FileNotFoundError(
                "mosquitto is not installed (Debian: apt-get install mosquitto)"
            )
        self.binary = found
        self.host = host
        self.port = port or free_port(host)
        self.listener_options = listener_options
        self.users = users
        self.persistence_dir = persistence_dir
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> MosquittoProcess:
        """Start the broker and return once it accepts connections."""
        self._dir = tempfile.TemporaryDirectory(prefix="fleetprobe-mosquitto-")
        config = Path(self._dir.name) / "mosquitto.conf"
        access = "allow_anonymous true\n"
        if self.users is not None:
            passwords = Path(self._dir.name) / "passwords"
            passwords.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
            subprocess.run(["mosquitto_passwd", "-U", str(passwords)], check=True)
            # Started as root, mosquitto reads it after dropping to its own user.
            Path(self._dir.name).chmod(0o755)
            passwords.chmod(0o644)
            access = f"allow_anonymous false\npassword_file {passwords}\n"
        persistence = "persistence false\n"
        if self.persistence_dir is not None:
            self.persistence_dir.mkdir(parents=True, exist_ok=True)
            self.persistence_dir.chmod(0o777)  # written by mosquitto's own user
            persistence = f"persistence true\npersistence_location {self.persistence_dir}/\n"
            if os.geteuid() == 0:
                # Mosquitto started as root drops to its own user, which cannot reach a
                # folder below a root-only one (a test's tmp_path): it then saves nothing.
                persistence += "user root\n"
        config.write_text(
            f"listener {self.port} {self.host}\n"
            f"{self.listener_options}\n"
            f"{access}"
            "set_tcp_nodelay true\n"
            f"{persistence}"
            "max_queued_messages 100000\n"
            "log_type error\nlog_type warning\n"
        )
        self._process = subprocess.Popen(
            [self.binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._wait_ready()
        return self

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after 5 s)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if process is not None and process.stderr is not None:
            process.stderr.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                error = (
                    self._process.stderr.read().decode(errors="replace")
                    if self._process.stderr
                    else ""
                )
                raise RuntimeError(
                    f"mosquitto exited with {self._process.returncode}: {error.strip()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.02)  # polling a port: there is no event to wait on
        self.stop()
        raise RuntimeError(f"mosquitto did not accept connections within {READY_TIMEOUT_S:g}s")
