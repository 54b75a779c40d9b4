"""Node labels from verified attributes (issue 12, point 4).

Tables: the labels a verified VM gets (gateway/join/labels.py) — bound or not, tags a token
lists or not, tag names compared as Azure compares them, values out of Azure's bounds left
out; ``spec.azure.labels_from_tags`` in token files (gateway/join/rules.py), its errors
with file and line, and the error naming the token when ``azure.vm_binding`` is off; the
``labels`` object of the registration (gateway/protocol/labels.py, register.py): absent
when empty, strict on decoding.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gateway.core.config import ConfigError
from gateway.join.binding import VmIdentity
from gateway.join.labels import node_labels
from gateway.join.rules import load_token_files
from gateway.protocol import HostParams, JoinBlock, Registration, WireError, decode_registration
from tests.support.tokens import azure_token_yaml

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
SUB = "11111111-1111-1111-1111-111111111111"
VM_ID = "b1310a36-d400-46f6-82cb-6217df846586"
RID = f"/subscriptions/{SUB}/resourceGroups/Web/providers/Microsoft.Compute/virtualMachines/web-1"

BOUND = VmIdentity(
    resource_id=RID,
    subscription_id=SUB,
    resource_group="Web",
    vm_name="web-1",
    vm_id=VM_ID,
    scale_set=None,
    identity_kind="system_assigned",
    arm_verified=True,
    location="westeurope",
    tags={"env": "prod", "Team": "infra", "cost": "42"},
)
BASE = {
    "azure/tenant": TENANT,
    "azure/subscription": SUB,
    "azure/resource_group": "Web",
    "azure/vm_id": VM_ID,
}
BOUND_BASE = {**BASE, "azure/location": "westeurope", "azure/vm_name": "web-1"}

LABEL_CASES: list[tuple[str, VmIdentity, tuple[str, ...], dict[str, str]]] = [
    (
        "a bound VM gets the fixed labels and no tag the token does not list",
        BOUND,
        (),
        BOUND_BASE,
    ),
    (
        "a tag the token lists becomes azure/tag/<name>",
        BOUND,
        ("env",),
        {**BOUND_BASE, "azure/tag/env": "prod"},
    ),
    (
        "tag names compare as Azure does, and the key is spelled as the token spells it",
        BOUND,
        ("ENV", "team"),
        {**BOUND_BASE, "azure/tag/ENV": "prod", "azure/tag/team": "infra"},
    ),
    (
        "a listed tag the VM lacks gives no label",
        BOUND,
        ("owner",),
        BOUND_BASE,
    ),
    (
        "a Kelvin sign is not a K: no label (Azure folds ASCII only)",
        replace(BOUND, tags={"\u212aind": "x"}),
        ("kind",),
        BOUND_BASE,
    ),
    (
        "a uniform scale set instance has its set and instance ID",
        replace(BOUND, vm_name="pool_3", scale_set="pool", instance_id="3", tags={}),
        (),
        {
            **BOUND_BASE,
            "azure/vm_name": "pool_3",
            "azure/scale_set": "pool",
            "azure/instance_id": "3",
        },
    ),
    (
        "without VM binding only the token's and the document's facts are labels",
        replace(BOUND, arm_verified=False, location=None, tags=None, scale_set="pool"),
        ("env",),
        BASE,
    ),
    (
        "a tag value longer than Azure allows is left out",
        replace(BOUND, tags={"env": "p" * 257}),
        ("env",),
        BOUND_BASE,
    ),
    (
        "a tag value with a control character is left out",
        replace(BOUND, tags={"env": "prod\nforged=1"}),
        ("env",),
        BOUND_BASE,
    ),
]


@pytest.mark.parametrize(
    ("identity", "tags", "expected"),
    [c[1:] for c in LABEL_CASES],
    ids=[c[0] for c in LABEL_CASES],
)
def test_labels_from_verified_facts(
    identity: VmIdentity, tags: tuple[str, ...], expected: dict[str, str]
) -> None:
    got = node_labels(tenant=TENANT, vm_id=VM_ID, identity=identity, tags=tags)
    assert dict(got.labels) == expected


def test_a_label_left_out_is_named() -> None:
    got = node_labels(
        tenant=TENANT, vm_id=VM_ID, identity=replace(BOUND, tags={"env": "p" * 257}), tags=["env"]
    )
    assert got.omitted == ("label 'azure/tag/env': a value is at most 256 characters",)


# --- spec.azure.labels_from_tags ---------------------------------------------------------


def token_file(tmp_path: Path, labels: str | None) -> Path:
    """One azure token (``labelled``); ``labels_from_tags: LABELS`` on line 11 if given."""
    extra = f"    labels_from_tags: {labels}\n" if labels is not None else ""
    path = tmp_path / "tokens.yaml"
    path.write_text(azure_token_yaml(SUB, name="labelled") + extra)
    return path


def test_labels_from_tags_is_read_from_the_token(tmp_path: Path) -> None:
    registry = load_token_files([token_file(tmp_path, "[env, Cost-Center]")])
    assert registry.get("labelled").labels_from_tags == ("env", "Cost-Center")
    assert load_token_files([token_file(tmp_path, None)]).get("labelled").labels_from_tags == ()


CONFIG_ERRORS = [
    ("not a list", "env", "spec.azure.labels_from_tags must be a list"),
    ("an empty list", "[]", "must not be empty"),
    ("a name twice, in two cases", "[env, ENV]", "duplicate tag 'ENV' (tag names ignore case)"),
    ("a name Azure forbids", '["a/b"]', "labels_from_tags[0]: a tag name has none of"),
    ("a name too long", f"[{'k' * 513}]", "a tag name is 1..512 characters"),
    ("more tags than a VM can have", f"[{', '.join(f't{i}' for i in range(51))}]", "at most 50"),
    ("a number, not a name", "[1]", "labels_from_tags[0] must be a string"),
]


@pytest.mark.parametrize(
    ("labels", "message"), [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS]
)
def test_labels_from_tags_errors_name_file_and_line(
    tmp_path: Path, labels: str, message: str
) -> None:
    path = token_file(tmp_path, labels)
    with pytest.raises(ConfigError) as info:
        load_token_files([path])
    assert message in str(info.value)
    assert str(info.value).startswith(f"{path}:11:")


def test_labels_from_tags_without_vm_binding_is_an_error_naming_the_token(tmp_path: Path) -> None:
    path = token_file(tmp_path, "[env]")
    load_token_files([path], vm_binding=True)
    load_token_files([token_file(tmp_path, None)], vm_binding=False)
    with pytest.raises(ConfigError) as info:
        load_token_files([token_file(tmp_path, "[env]")], vm_binding=False)
    assert str(info.value).startswith(f"{path}:11: token 'labelled' spec.azure.labels_from_tags")
    assert "azure.vm_binding: true" in str(info.value)


# --- the registration's labels -------------------------------------------------------------


def registration(labels: dict[str, str]) -> Registration:
    ssh = ed25519.Ed25519PrivateKey.generate().public_key()
    tls = ec.generate_private_key(ec.SECP256R1()).public_key()
    return Registration(
        idempotency_key="k" * 32,
        token_name="labelled",
        role="Node",
        client_address="10.0.0.1",
        join=JoinBlock("azure", TENANT, SUB, "Web", VM_ID, RID),
        host=HostParams(
            node_name="web-1",
            role="Node",
            public_ssh_key=ssh.public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            ).decode(),
            public_tls_key=tls.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode(),
        ),
        labels=labels,
    )


def test_labels_travel_and_decode() -> None:
    labels = {**BOUND_BASE, "azure/tag/env": "prod", "azure/tag/empty": ""}
    reg = registration(labels)
    decoded = decode_registration(json.dumps(reg.to_json()).encode())
    assert dict(decoded.labels) == labels


def test_no_labels_means_no_key_an_older_auth_service_would_refuse() -> None:
    body = registration({}).to_json()
    assert "labels" not in body
    assert dict(decode_registration(json.dumps(body).encode()).labels) == {}


def _with(labels: Any) -> bytes:
    body = registration({}).to_json()
    body["labels"] = labels
    return json.dumps(body).encode()


WIRE_ERRORS: list[tuple[str, Any, str]] = [
    ("not an object", ["azure/tenant"], "labels must be an object"),
    ("a value that is not a string", {"azure/tenant": 1}, "values must be strings"),
    ("a key outside the namespace", {"team": "a"}, "outside the azure/ namespace"),
    ("an unknown azure/ key", {"azure/owner": "a"}, "outside the azure/ namespace"),
    ("a tag name Azure forbids", {"azure/tag/a?b": "x"}, "a tag name has none of"),
    ("an empty tag name", {"azure/tag/": "x"}, "a tag name is 1..512"),
    ("a tag name too long", {"azure/tag/" + "k" * 513: "x"}, "a tag name is 1..512"),
    ("a value too long", {"azure/tag/env": "v" * 257}, "at most 256 characters"),
    ("a value with a newline", {"azure/tag/env": "a\nb"}, "no control characters"),
    (
        "more tag labels than a VM has tags",
        {f"azure/tag/t{i}": "" for i in range(51)},
        "more than 50",
    ),
    ("more labels than there are keys", {f"azure/tag/t{i}": "" for i in range(59)}, "more than 58"),
]


@pytest.mark.parametrize(
    ("labels", "message"), [c[1:] for c in WIRE_ERRORS], ids=[c[0] for c in WIRE_ERRORS]
)
def test_the_auth_service_refuses_labels_out_of_bounds(labels: Any, message: str) -> None:
    with pytest.raises(WireError) as info:
        decode_registration(_with(labels))
    assert info.value.code.value == "invalid_request"
    assert message in info.value.message


def test_a_value_is_refused_for_exactly_the_control_characters() -> None:
    # C0, DEL and C1 are refused wherever they stand; every other code point (printable
    # or not: U+2028, U+00AD, ...) is a value's own business.
    from gateway.protocol.labels import label_problem

    control = {*range(0x20), *range(0x7F, 0xA0)}
    for cp in range(0x3000):
        for value in (chr(cp), f"ab{chr(cp)}", f"{chr(cp)}\u00e9"):
            refused = label_problem("azure/vm_name", value) is not None
            assert refused is (cp in control), (hex(cp), value)
