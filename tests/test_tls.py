"""MQTT over TLS: a Mosquitto TLS listener with certificates made in the test."""

from __future__ import annotations

import asyncio
import datetime
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from conftest import scenario_dict, write_scenario
from fleetprobe.app.exit_codes import ExitCode
from fleetprobe.app.run import RunOptions, RunResult, run_scenario
from fleetprobe.app.scenario import load_scenario
from fleetprobe.testbed.mosquitto import MosquittoProcess


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[tuple[str, Path]]:
    """A TLS-only Mosquitto and the folder holding its CA (ca.pem)."""
    # Mosquitto started as root reads its certificates as the 'mosquitto' user: the folder
    # must be readable by others (pytest's own temporary folders are not).
    folder = Path(tempfile.mkdtemp(prefix="fleetprobe-tls-"))
    folder.chmod(0o755)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    server.private_key_pem.write_to_path(str(folder / "server.key"))
    trustme.CA().cert_pem.write_to_path(str(folder / "other-ca.pem"))
    for file in folder.iterdir():
        file.chmod(0o644)  # throwaway test material
    options = f"cafile {folder}/ca.pem\ncertfile {folder}/server.pem\nkeyfile {folder}/server.key"
    try:
        with MosquittoProcess(listener_options=options) as broker:
            yield f"mqtts://127.0.0.1:{broker.port}", folder
    finally:
        shutil.rmtree(folder)


async def run_with_ca(tls_broker: tuple[str, Path], prefix: str, ca_file: str) -> dict[str, Any]:
    """Run a short scenario against the TLS broker, trusting ``ca_file``."""
    url, folder = tls_broker
    scenario = scenario_dict(url, prefix, duration="500ms")
    scenario["target"]["mqtt"]["tls"] = {"ca": ca_file}
    loaded = load_scenario(write_scenario(folder / f"{prefix}.yaml", scenario))
    async with asyncio.timeout(30):
        result = await run_scenario(loaded, RunOptions(handle_signals=False))
    return {"exit_code": result.exit_code, **result.report}


async def test_signals_are_followed_over_tls(tls_broker: tuple[str, Path], prefix: str) -> None:
    """mqtts:// with the broker's CA (relative to the scenario file) sends and follows."""
    report = await run_with_ca(tls_broker, prefix, "ca.pem")
    assert report["exit_code"] == ExitCode.OK
    assert report["chains"]["telemetry"]["ok"] == report["signals"]["telemetry"]["sent"] > 0


async def test_a_broker_signed_by_another_ca_is_unreachable(
    tls_broker: tuple[str, Path], prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A certificate that does not verify ends the run with exit 3 and says why."""
    report = await run_with_ca(tls_broker, prefix, "other-ca.pem")
    assert report["exit_code"] == ExitCode.UNREACHABLE
    assert "certificate verify failed" in caplog.text
    assert report["signals"]["telemetry"]["sent"] == 0


@pytest.fixture(scope="module")
def tls_material() -> Iterator[Path]:
    """A CA, a client certificate it signed, an expired server certificate it signed."""
    folder = Path(tempfile.mkdtemp(prefix="fleetprobe-mtls-"))
    folder.chmod(0o755)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    for name, cert in (
        ("server", ca.issue_cert("127.0.0.1")),
        ("client", ca.issue_cert("fleet-client")),
        ("expired", ca.issue_cert("127.0.0.1", not_after=datetime.datetime(2020, 1, 1))),
    ):
        cert.cert_chain_pems[0].write_to_path(str(folder / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(folder / f"{name}.key"))
    for file in folder.iterdir():
        file.chmod(0o644)  # throwaway test material, read by mosquitto's own user
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def tls_listener(folder: Path, server: str, *, require_client_cert: bool) -> str:
    options = (
        f"cafile {folder}/ca.pem\ncertfile {folder}/{server}.pem\nkeyfile {folder}/{server}.key"
    )
    return options + ("\nrequire_certificate true" if require_client_cert else "")


async def run_tls(folder: Path, url: str, prefix: str, tls: dict[str, str]) -> RunResult:
    scenario = scenario_dict(url, prefix, duration="500ms")
    scenario["target"]["mqtt"]["tls"] = tls
    loaded = load_scenario(write_scenario(folder / f"{prefix}.yaml", scenario))
    async with asyncio.timeout(30):
        return await run_scenario(loaded, RunOptions(handle_signals=False))


async def test_mutual_tls_needs_the_client_certificate(
    tls_material: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker that requires client certificates: with cert and key the run follows its
    signals; without them it ends with exit 3 and says the TLS handshake failed."""
    options = tls_listener(tls_material, "server", require_client_cert=True)
    with MosquittoProcess(listener_options=options) as broker:
        url = f"mqtts://127.0.0.1:{broker.port}"
        mutual = await run_tls(
            tls_material, url, prefix, {"ca": "ca.pem", "cert": "client.pem", "key": "client.key"}
        )
        alone = await run_tls(tls_material, url, f"{prefix}x", {"ca": "ca.pem"})
    sent = mutual.report["signals"]["telemetry"]["sent"]
    assert (
        mutual.exit_code == ExitCode.OK and mutual.report["chains"]["telemetry"]["ok"] == sent > 0
    )
    assert alone.exit_code == ExitCode.UNREACHABLE
    assert f"cannot connect to {url}" in caplog.text
    assert "requires a client certificate that was not given" in caplog.text


async def test_an_expired_broker_certificate_is_refused_saying_so(
    tls_material: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    options = tls_listener(tls_material, "expired", require_client_cert=False)
    with MosquittoProcess(listener_options=options) as broker:
        url = f"mqtts://127.0.0.1:{broker.port}"
        result = await run_tls(tls_material, url, prefix, {"ca": "ca.pem"})
    assert result.exit_code == ExitCode.UNREACHABLE
    assert "certificate has expired" in caplog.text
    assert result.report["signals"]["telemetry"]["sent"] == 0
