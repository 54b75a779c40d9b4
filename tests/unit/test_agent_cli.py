"""The agent's commands: ``status`` prints both pins, ``agent`` and ``install systemd`` wire up."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from gateway.authservice import AuthPaths
from gateway.cli import main
from tests.support.binaries import require_binary

NODE_OK = """\
version: v3
teleport:
  join_params: {token_name: t, method: azure}
  proxy_server: 127.0.0.1:9
"""


def test_status_prints_the_ssh_ca_pin_as_ssh_keygen_hashes_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keygen = require_binary("ssh-keygen")
    assert main(["auth", "init", "--data-dir", str(tmp_path / "auth")]) == 0
    capsys.readouterr()
    assert main(["status", "--auth-data-dir", str(tmp_path / "auth")]) == 0
    lines = capsys.readouterr().out.splitlines()
    [ssh_line] = [line for line in lines if line.startswith("SSH CA pin: ")]
    pin = ssh_line.removeprefix("SSH CA pin: ")
    assert pin.startswith("sha256:") and len(pin) == len("sha256:") + 64
    # ssh-keygen prints the same SHA-256 of the key blob, as unpadded base64.
    listing = subprocess.run(
        [keygen, "-l", "-E", "sha256", "-f", str(AuthPaths.for_dir(tmp_path / "auth").ssh_ca_pub)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    b64 = listing.split()[1].removeprefix("SHA256:")
    assert base64.b64decode(b64 + "=" * (-len(b64) % 4)).hex() == pin.removeprefix("sha256:")


@pytest.mark.parametrize(
    ("config", "extra", "code"),
    [
        ("version: v2\n", [], 2),
        (NODE_OK, ["--retry-cap", "0"], 2),
        (NODE_OK, ["--ca-file", "/nonexistent/ca.pem", "--imds-url", "http://127.0.0.1:9"], 2),
    ],
    ids=[
        "a broken node config is a usage error",
        "a retry cap of zero is a usage error",
        "a CA file that cannot be loaded is a usage error, not a retry loop",
    ],
)
def test_agent_usage_errors(tmp_path: Path, config: str, extra: list[str], code: int) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(config)
    argv = ["agent", "--config", str(path), "--data-dir", str(tmp_path / "d"), *extra]
    assert main(argv) == code
