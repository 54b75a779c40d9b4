"""Fixtures shared by the integration tests that need a real OpenBao."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.openbao import OpenBao, VaultSetup, openbao_server, run_vault_setup


@pytest.fixture
def bao(tmp_path: Path) -> Iterator[OpenBao]:
    """A ``bao server -dev`` of the test's own."""
    with openbao_server(tmp_path) as server:
        yield server


@pytest.fixture
def setup(bao: OpenBao, tmp_path: Path) -> VaultSetup:
    """``bao`` configured by ``join-gateway auth vault-setup`` (an AppRole to sign with)."""
    return run_vault_setup(bao, tmp_path)
