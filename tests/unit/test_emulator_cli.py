"""``join-gateway emulator`` as its own process: INFO.json, then a clean exit on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUN = (
    "import argparse, sys\n"
    "from gateway.dev.emulator import cli\n"
    "p = argparse.ArgumentParser()\n"
    "cli.add_arguments(p)\n"
    "sys.exit(cli.run(p.parse_args(sys.argv[1:])))\n"
)
ROOT = Path(__file__).resolve().parents[2]


def _start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", RUN, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"emulator exited early: {proc.stderr.read() if proc.stderr else b''!r}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("emulator did not write its info file")
        time.sleep(0.05)


def test_generated_fleet_info_and_sigterm(tmp_path: Path) -> None:
    info_path = tmp_path / "info.json"
    proc = _start(
        "--vms",
        "12",
        "--subscriptions",
        "2",
        "--resource-groups",
        "3",
        "--scale-set-fraction",
        "0.5",
        "--scale-set-capacity",
        "4",
        "--info-out",
        str(info_path),
        "--latency-arm-ms",
        "0",
    )
    try:
        _wait_for(info_path, proc)
        info = json.loads(info_path.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert info["http_url"].startswith("http://127.0.0.1:")
    assert info["https_url"].startswith("https://127.0.0.1:")
    assert info["aia_prefix"] == info["http_url"] + "/pkiops/certs/"
    assert info["tls_ca_pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert info["attestation_root_pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert len(info["vms"]) == 12
    assert len(info["subscriptions"]) == 2
    assert sum(1 for v in info["vms"] if v["scale_set"]) == 6
    assert set(info["vms"][0]) >= {
        "name",
        "vm_id",
        "resource_id",
        "subscription",
        "resource_group",
        "tenant",
        "identity",
        "client_id",
        "principal_oid",
        "scale_set",
        "instance_id",
        "imds_url",
    }
    assert all(v["imds_url"] == info["http_url"] + "/vm/" + v["name"] for v in info["vms"])


@pytest.mark.parametrize(
    ("fleet", "code"),
    [
        ("vms: [{name: a}]\n", 2),
        ("generate: {vms: 2, bogus: 1}\n", 2),
    ],
    ids=["a fleet file with a VM missing keys exits 2", "an unknown generate option exits 2"],
)
def test_bad_fleet_file_exits_2(tmp_path: Path, fleet: str, code: int) -> None:
    fleet_path = tmp_path / "fleet.yaml"
    fleet_path.write_text(fleet)
    proc = _start("--fleet", str(fleet_path), "--info-out", str(tmp_path / "info.json"))
    assert proc.wait(timeout=30) == code
    assert not (tmp_path / "info.json").exists()


def test_fleet_file_with_named_vms(tmp_path: Path) -> None:
    fleet_path = tmp_path / "fleet.yaml"
    fleet_path.write_text(
        "tenants: [44444444-4444-4444-4444-444444444444]\n"
        "vms:\n"
        "  - {name: web-1, subscription: 11111111-1111-1111-1111-111111111111,\n"
        "     resource_group: group1, tenant: 44444444-4444-4444-4444-444444444444,\n"
        "     identity: user, client_id: 55555555-5555-5555-5555-555555555555}\n"
    )
    info_path = tmp_path / "info.json"
    proc = _start("--fleet", str(fleet_path), "--info-out", str(info_path))
    try:
        _wait_for(info_path, proc)
        info = json.loads(info_path.read_text())
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    assert info["tenants"] == ["44444444-4444-4444-4444-444444444444"]
    assert [v["client_id"] for v in info["vms"]] == ["55555555-5555-5555-5555-555555555555"]


def test_port_in_use_exits_3(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _start(
            "--vms", "1", "--http-port", str(port), "--info-out", str(tmp_path / "i.json")
        )
        assert proc.wait(timeout=30) == 3
