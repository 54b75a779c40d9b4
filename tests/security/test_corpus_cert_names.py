"""Hostile certificate names over HTTPS: the attack of issue 12 (an admitted VM, vm-a, got
certificates for vm-b, auth.cluster.internal, localhost and 10.0.0.5), wildcards, IDNA
look-alikes, overlong names and addresses no certificate carries — each refused, by the
schema (400 invalid_request: a name no certificate could carry at all) or by the name
policy (403 name_not_allowed: a well-formed name that is not this VM's), and the gateway
keeps serving. The token lets vm-a name ``{vm_name}.internal`` and its own NIC address.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.security.harness import Harness

pytestmark = pytest.mark.asyncio(loop_scope="module")

NOT_ALLOWED = (403, "name_not_allowed")
MALFORMED = (400, "invalid_request")

# (field, value) -> (status, code); "<nic>" is vm-a's own NIC address, "<nic-b>" vm-b's.
CASES: list[tuple[str, str, Any, tuple[int, str | None]]] = [
    ("vm-a's own names and NIC address join", "dns_names", ["vm-a.internal"], (200, None)),
    ("vm-a's own NIC address joins", "additional_principals", ["<nic>"], (200, None)),
    # the attack, name by name
    ("another VM's name as node name", "node_name", "vm-b", NOT_ALLOWED),
    ("another VM's name as a principal", "additional_principals", ["vm-b"], NOT_ALLOWED),
    ("another VM's host name", "dns_names", ["vm-b.internal"], NOT_ALLOWED),
    ("the auth service's name", "dns_names", ["auth.cluster.internal"], NOT_ALLOWED),
    ("localhost as node name", "node_name", "localhost", NOT_ALLOWED),
    ("localhost as a DNS name", "dns_names", ["localhost"], NOT_ALLOWED),
    ("an IP on no NIC of this VM", "additional_principals", ["10.0.0.5"], NOT_ALLOWED),
    ("another VM's NIC address", "additional_principals", ["<nic-b>"], NOT_ALLOWED),
    ("IPv4 loopback", "additional_principals", ["127.0.0.1"], NOT_ALLOWED),
    ("IPv6 loopback", "additional_principals", ["::1"], NOT_ALLOWED),
    ("IMDS's link-local address", "additional_principals", ["169.254.169.254"], NOT_ALLOWED),
    ("an IPv6 link-local address", "additional_principals", ["fe80::1"], NOT_ALLOWED),
    ("the unspecified address", "additional_principals", ["0.0.0.0"], NOT_ALLOWED),
    ("a multicast address", "dns_names", ["224.0.0.1"], NOT_ALLOWED),
    (
        "an IPv4-mapped form of the NIC address",
        "additional_principals",
        ["::ffff:<nic>"],
        NOT_ALLOWED,
    ),
    # wildcards and look-alikes
    ("a bare wildcard", "additional_principals", ["*"], MALFORMED),
    ("a wildcard label", "dns_names", ["*.internal"], MALFORMED),
    (
        "a punycode look-alike of the VM's host name",
        "dns_names",
        ["xn--vm-a-ss.internal"],
        NOT_ALLOWED,
    ),
    ("a Kelvin sign for a K", "node_name", "\u212avm-a", MALFORMED),
    ("fullwidth letters", "dns_names", ["\uff56\uff4d-a.internal"], MALFORMED),
    ("vm-a in capitals is vm-a", "node_name", "VM-A", (200, None)),
    # overlong
    ("a label longer than 63", "dns_names", ["a" * 64 + ".internal"], MALFORMED),
    ("a name longer than 253", "dns_names", [".".join(["a" * 63] * 4)], MALFORMED),
]


@pytest.mark.parametrize(
    ("field", "value", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_certificate_names_corpus(
    harness: Harness, field: str, value: Any, expected: tuple[int, str | None]
) -> None:
    nics = {"<nic>": harness.vm.private_ips[0], "<nic-b>": harness.neighbour.private_ips[0]}

    def fill(v: str) -> str:
        for k, ip in nics.items():
            v = v.replace(k, ip)
        return v

    body = harness.body(await harness.challenge())
    body["host"]["additional_principals"] = []
    body["host"]["dns_names"] = []
    body["host"][field] = [fill(v) for v in value] if isinstance(value, list) else fill(value)
    assert await harness.join(body) == expected
    await harness.assert_alive()
