"""``join-gateway demo`` as a user runs it: the fleet joins, then renews, one node locked."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_the_demo_shows_the_birth_and_the_life_of_the_nodes() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--vms", "20", "--latency", "none"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "every outcome as expected" in text
    assert "every renewal as expected" in text
    # 20 VMs plus one a tag rule admits and one an identity rule admits.
    assert re.search(r"joined\s+22\n", text)
    assert re.search(r"refused: not_allowed\s+8\n", text)
    # The tag-based and the identity-based refusals are among them.
    flat = " ".join(text.split())  # the list of refused VMs is wrapped
    assert "tagged-dev (not_allowed)" in flat and "other-identity (not_allowed)" in flat
    assert re.search(r"renewed, same host ID\s+21\n", text)
    assert re.search(r"refused: host_locked\s+1\n", text)
    assert re.search(r"inventory \(nodes ls\)\s+23 hosts, 1 locked, 21 renewals recorded", text)
