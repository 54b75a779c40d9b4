"""The storm's Vault: a throwaway ``bao server -dev`` (``gateway/dev/openbao.py``) set up by
``vault-setup``, which ``join-gateway auth serve --ca-backend vault`` signs through.

Vault's work is counted from Vault's own side: a file audit device logs every request it
answers, and :meth:`StormVault.calls` counts them by path — so "Vault calls per join" is
what OpenBao saw, not what the auth service thinks it sent.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

from benchmarks.stack import StackError, process_cpu_seconds
from gateway.dev.openbao import AppRoleFiles, OpenBao, find_bao, set_up_approle

__all__ = ["StormVault"]


class StormVault:
    """Parameters: ``workdir`` — the server's log, audit log and credentials."""

    def __init__(self, workdir: Path) -> None:
        if find_bao() is None:
            raise StackError("--compare-ca-backends needs OpenBao's bao on PATH")
        workdir.mkdir(parents=True, exist_ok=True)
        self._audit = workdir / "audit.log"
        # OpenBao enables audit devices from its configuration only.
        path = json.dumps(str(self._audit))
        audit = f'audit "file" "storm" {{\n  options {{\n    file_path = {path}\n  }}\n}}\n'
        self._bao = OpenBao(workdir, config_hcl=audit)
        self._approle: AppRoleFiles | None = None

    def start(self) -> list[str]:
        """Start and set up; the ``auth serve`` arguments that sign through it."""
        self._bao.start()
        self._approle = asyncio.run(set_up_approle(self._bao, self._audit.parent))
        return [
            "--ca-backend", "vault", "--vault-addr", self._approle.addr,
            "--vault-approle-role-id", self._approle.role_id,
            "--vault-approle-secret-id-file", str(self._approle.secret_id_file),
        ]  # fmt: skip

    def calls(self) -> Counter[str]:
        """Requests OpenBao answered, by path (its audit log's response entries)."""
        found: Counter[str] = Counter()
        if not self._audit.exists():
            return found
        for line in self._audit.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry.get("type") == "response":
                found[str(entry.get("request", {}).get("path", "?"))] += 1
        return found

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self._bao.pid)

    def stop(self) -> None:
        self._bao.stop()
