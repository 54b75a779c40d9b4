"""``join-gateway install systemd``: the unit it writes passes ``systemd-analyze verify``.

``verify`` loads the unit as systemd would: an unknown directive, a bad value or an
``ExecStart=`` binary that does not exist is reported. The unit points at the real installed
``join-gateway`` (the one beside this Python), as it would on a node.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from tests.support.binaries import require_binary

NODE_YAML = """\
version: v3
teleport:
  join_params: {token_name: azure-token, method: azure}
  proxy_server: gw.example.com:443
"""

EXECUTABLE = Path(sys.executable).parent / "join-gateway"


def _verify(unit: Path) -> str:
    analyze = require_binary("systemd-analyze")
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    # Unknown keys and bad values are warnings (exit 0): any line about our unit fails.
    complaints = [line for line in done.stderr.splitlines() if unit.name in line]
    assert not complaints, complaints
    return done.stderr


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize(
    ("data_dir", "state"),
    [
        (None, ("StateDirectory", "teleport")),
        ("/var/lib/join-gateway/node", ("StateDirectory", "join-gateway/node")),
        ("/srv/node-identity", ("ReadWritePaths", "/srv/node-identity")),
    ],
    ids=[
        "the default data_dir becomes the unit's StateDirectory",
        "a data_dir deeper under /var/lib is a nested StateDirectory",
        "a data_dir outside /var/lib is made writable explicitly",
    ],
)
def test_the_unit_verifies_and_is_hardened(
    tmp_path: Path, data_dir: str | None, state: tuple[str, str]
) -> None:
    assert EXECUTABLE.is_file(), "the test runs from an installed checkout (pip install -e)"
    config = tmp_path / "node.yaml"
    config.write_text(NODE_YAML)
    unit = tmp_path / "join-gateway-agent.service"
    argv = ["install", "systemd", "--config", str(config), "-o", str(unit)]
    if data_dir is not None:
        argv += ["--data-dir", data_dir]
    assert main(argv) == 0
    _verify(unit)
    d = _directives(unit.read_text())
    assert d["ExecStart"] == [
        f"{EXECUTABLE} agent --config {config} --data-dir {data_dir or '/var/lib/teleport'}"
    ]
    assert d["Restart"] == ["on-failure"]
    assert d["RestartPreventExitStatus"] == ["2 4"]
    for key, value in (
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("CapabilityBoundingSet", ""),
        state,
    ):
        assert d[key] == [value], key


def test_a_broken_unit_is_caught_by_the_check(tmp_path: Path) -> None:
    """The check above can fail: a missing binary and a misspelt directive are both caught."""
    config = tmp_path / "node.yaml"
    config.write_text(NODE_YAML)
    unit = tmp_path / "join-gateway-agent.service"
    assert main(["install", "systemd", "--config", str(config), "-o", str(unit)]) == 0
    good = unit.read_text()
    for broken in (
        good.replace(str(EXECUTABLE), str(tmp_path / "missing" / "join-gateway")),
        good.replace("NoNewPrivileges=", "NoNewPrivilegez="),
    ):
        unit.write_text(broken)
        with pytest.raises(AssertionError):
            _verify(unit)


def test_without_output_the_unit_is_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(NODE_YAML)
    assert main(["install", "systemd", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith("# Written by `join-gateway install systemd`.")
    config.write_text("version: v2\n")
    assert main(["install", "systemd", "--config", str(config)]) == 2


def test_paths_the_hardening_hides_are_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(NODE_YAML)
    argv = ["install", "systemd", "--config", str(config), "--executable"]
    assert main([*argv, "/home/ops/venv/bin/join-gateway"]) == 0
    assert "ProtectHome=yes hides" in capsys.readouterr().err
    assert main([*argv, "/usr/local/bin/join-gateway"]) == 0
    assert "ProtectHome" not in capsys.readouterr().err
