"""The CLI's wiring: each sub-command reaches its library code with the right exit codes."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import COMMANDS, build_parser, main
from tests.support.data import REAL

REPO = Path(__file__).resolve().parents[2]


def test_every_design_command_exists() -> None:
    for name in ("serve", "join", "auth", "emulator", "status", "demo", "inspect", "check-config"):
        assert name in COMMANDS
    build_parser()  # every sub-command's arguments build


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2


def test_serve_does_not_import_the_emulator() -> None:
    code = (
        "import sys; from gateway.cli import build_parser; build_parser('serve');"
        "import gateway.server.serve, gateway.join.deps;"
        "print(any(m.startswith('gateway.dev') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_inspect_accepts_a_real_document_through_the_cli(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [
        "inspect",
        "--attested",
        str(REAL / "attested" / "attested-taskcluster-2026-07-28.json"),
        "--at-created",
        "--json",
    ]
    for pem in sorted((REAL / "ca").glob("*.pem")):
        args += ["--ca-bundle", str(pem)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "accepted"
    assert report["signer"] == "metadata.azure.com"


def test_inspect_unreadable_input_is_exit_2(tmp_path: Path) -> None:
    assert main(["inspect", "--attested", str(tmp_path / "missing.json")]) == 2


def test_challenge_keys_new_then_rotate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    assert main(["challenge-keys", "new", str(keys)]) == 0
    assert main(["challenge-keys", "new", str(keys)]) == 1  # never overwrites
    assert main(["challenge-keys", "rotate", str(keys)]) == 0
    assert "2 key(s)" in capsys.readouterr().out
    assert main(["challenge-keys", "add", str(keys)]) == 0
    assert "3 key(s)" in capsys.readouterr().out
    assert main(["challenge-keys", "promote", str(keys)]) == 0
    assert main(["challenge-keys", "retire", str(keys)]) == 0
    assert "1 key(s)" in capsys.readouterr().out.splitlines()[-1]
    assert main(["challenge-keys", "promote", str(keys)]) == 1  # one key: nothing to promote


def test_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["challenge-keys", "new", str(tmp_path / "keys")]) == 0
    (tmp_path / "tls.crt").write_text("x")
    (tmp_path / "tls.key").write_text("x")
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        f"tls: {{cert_file: tls.crt, key_file: tls.key}}\n"
        f"challenge: {{keys_file: keys}}\n"
        f"tokens: {{files: [{REPO / 'config' / 'token.yaml'}]}}\n"
    )
    assert main(["check-config", "-c", str(cfg)]) == 0
    assert "azure-token" in capsys.readouterr().out
    cfg.write_text("tokens: {files: [nope.yaml]}\nworkerz: 2\n")
    assert main(["check-config", "-c", str(cfg)]) == 1
    assert "unknown key 'workerz'" in capsys.readouterr().err


def test_status_prints_the_auth_service_ca_pin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["auth", "init", "--data-dir", str(tmp_path / "auth")]) == 0
    capsys.readouterr()
    assert main(["status", "--auth-data-dir", str(tmp_path / "auth")]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("CA pin: sha256:") and len(first.split("sha256:")[1]) == 64
    assert main(["status"]) == 2


def test_serve_with_a_broken_config_is_a_startup_failure(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("listeners: 3\n")
    assert main(["serve", "-c", str(cfg)]) == 3


@pytest.mark.parametrize(
    "created",
    [
        pytest.param([1_764_288_000.0], id="one record"),
        pytest.param([1_764_288_000.001, 1_764_288_000.999], id="same second"),
        pytest.param([1_764_288_000.999, 1_764_288_001.0, 1_764_288_000.5], id="next, back"),
        pytest.param([1_764_287_999.9995, 1_764_288_059.25], id="minute boundary"),
    ],
)
def test_the_log_formatter_writes_the_default_time_text(created: list[float]) -> None:
    """The CLI's formatter remembers its date and time text a second at a time; every
    line must read exactly as logging's own formatter writes it."""
    from gateway.cli import _Formatter

    fmt = "%(asctime)s %(levelname)s %(name)s %(message)s"
    mine, stock = _Formatter(fmt), logging.Formatter(fmt)
    for at in created:
        record = logging.LogRecord("gateway.audit", logging.INFO, __file__, 0, "x", None, None)
        record.created, record.msecs = at, int((at - int(at)) * 1000) + 0.0
        assert mine.format(record) == stock.format(record)
    record.created = created[0]
    assert mine.formatTime(record, "%H") == stock.formatTime(record, "%H")
