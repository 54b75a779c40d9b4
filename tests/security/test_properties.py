"""Property tests: whatever bytes arrive, the decoders answer with one of our 400s.

* ``decode_join_request`` over arbitrary bytes, arbitrary JSON, and near-valid bodies (a
  valid body with one field replaced, removed or added, or its text edited) raises only
  ``BadRequest`` — and whatever it accepts satisfies the schema's invariants.
* ``parse_signed_data`` over *structured* mutations of a real Azure document's DER: the
  document is parsed into its TLV tree and whole nodes are dropped, duplicated, swapped,
  re-tagged, re-encoded (BER long-form or indefinite lengths), wrapped or replaced. Byte
  flips and truncations are in tests/unit/test_cms.py; these reach the parser's
  structure handling that random bytes rarely do. The synchronous verification steps that
  follow parsing must also raise only our errors.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.agent.keys import NodeKeys, load_or_create_keys
from gateway.azure.attested import (
    check_digest_algorithm,
    check_signature,
    check_signer_name,
    check_single_signer,
    find_signer_certificate,
    parse_content,
)
from gateway.azure.cms import parse_signed_data
from gateway.core.cloud import CLOUDS
from gateway.core.errors import BadRequest, Code, GatewayError
from gateway.http.schema import decode_join_request
from tests.support.data import REAL_ATTESTED

REAL_DOC = REAL_ATTESTED / "attested-taskcluster-2026-07-28.json"
SCHEMA_CODES = {Code.MALFORMED_BODY, Code.INVALID_REQUEST}
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------- join bodies

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)
JOIN_KEYS = [
    "token_name",
    "challenge",
    "attested_data",
    "intermediates",
    "access_token",
    "host",
    "host.node_name",
    "host.role",
    "host.public_ssh_key",
    "host.public_tls_key",
    "host.additional_principals",
    "host.dns_names",
    "attested_data.encoding",
    "attested_data.signature",
]
_NO_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@pytest.fixture(scope="module")
def node_keys(tmp_path_factory: pytest.TempPathFactory) -> NodeKeys:
    return load_or_create_keys(tmp_path_factory.mktemp("prop-keys"))


def _valid_body(keys: NodeKeys) -> dict[str, Any]:
    return {
        "token_name": "azure-token",
        "challenge": "A" * 32,
        "attested_data": {"encoding": "pkcs7", "signature": "MIIB"},
        "intermediates": [base64.b64encode(b"\x30\x00").decode()],
        "access_token": "a.b.c",
        "host": {
            "node_name": "web-1",
            "role": "Node",
            "public_ssh_key": keys.public_ssh_key,
            "public_tls_key": keys.public_tls_key,
            "additional_principals": ["10.0.0.4"],
            "dns_names": ["web-1.internal"],
        },
    }


def _decode_or_400(raw: bytes) -> None:
    try:
        req = decode_join_request(raw, client_address="192.0.2.1")
    except BadRequest as exc:
        assert exc.code in SCHEMA_CODES, exc.code
        return
    # Whatever is accepted satisfies the schema: names without control characters
    # (they end up in certificates and logs), bounded lists.
    for name in (req.token_name, req.host.node_name, *req.host.dns_names):
        assert not _NO_CONTROL.search(name), repr(name)
    for principal in req.host.additional_principals:
        assert not _NO_CONTROL.search(principal), repr(principal)
    assert len(req.intermediates) <= 8
    assert len(req.host.dns_names) <= 32


@SETTINGS
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_only_raise_bad_request(data: bytes) -> None:
    _decode_or_400(data)


@SETTINGS
@given(JSON)
def test_arbitrary_json_only_raises_bad_request(value: object) -> None:
    _decode_or_400(json.dumps(value).encode())


def test_the_near_valid_base_body_decodes(node_keys: NodeKeys) -> None:
    """The mutations below start from a body that decodes: they test one change each."""
    decode_join_request(json.dumps(_valid_body(node_keys)).encode(), client_address="x")


@SETTINGS
@given(
    st.sampled_from(JOIN_KEYS),
    st.sampled_from(["replace", "delete", "add"]),
    JSON,
    st.text(max_size=12),
)
def test_near_valid_bodies_only_raise_bad_request(
    node_keys: NodeKeys, path: str, action: str, value: object, new_key: str
) -> None:
    body = _valid_body(node_keys)
    *parents, last = path.split(".")
    node = body
    for p in parents:
        node = node[p]
    if action == "replace":
        node[last] = value
    elif action == "delete":
        del node[last]
    else:
        target = node[last] if isinstance(node[last], dict) else node
        target[new_key] = value
    _decode_or_400(json.dumps(body).encode())


@SETTINGS
@given(st.sampled_from(JOIN_KEYS[6:12] + JOIN_KEYS[:2]), st.text(max_size=300))
def test_near_valid_string_fields_only_raise_bad_request(
    node_keys: NodeKeys, path: str, text: str
) -> None:
    """Arbitrary text (control characters, surrogates, newlines) in each string field."""
    body = _valid_body(node_keys)
    *parents, last = path.split(".")
    node = body
    for p in parents:
        node = node[p]
    node[last] = [text] if isinstance(node[last], list) else text
    _decode_or_400(json.dumps(body).encode("utf-8", "surrogatepass"))


@SETTINGS
@given(st.data())
def test_edited_body_text_only_raises_bad_request(node_keys: NodeKeys, data: st.DataObject) -> None:
    text = bytearray(json.dumps(_valid_body(node_keys)).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text) - 1))
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        byte = data.draw(st.sampled_from(list(b'{}[]",:\\ \n0a\x00\xff')))
        if op == "set":
            text[i] = byte
        elif op == "insert":
            text.insert(i, byte)
        else:
            del text[i]
    _decode_or_400(bytes(text))


# ---------------------------------------------------------------------- CMS structure


@dataclass
class Tlv:
    """One DER node: identifier octet, and either children or primitive content."""

    tag: int
    content: bytes = b""
    children: list[Tlv] | None = None
    length_form: str = "der"  # "der", "long" (non-minimal), "indefinite"

    def encode(self) -> bytes:
        body = (
            b"".join(c.encode() for c in self.children)
            if self.children is not None
            else self.content
        )
        if self.length_form == "indefinite" and self.tag & 0x20:
            return bytes([self.tag, 0x80]) + body + b"\x00\x00"
        if self.length_form == "long":
            n = len(body).to_bytes(4, "big")
            return bytes([self.tag, 0x84]) + n + body
        return bytes([self.tag]) + _der_len(len(body)) + body


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _parse(data: bytes) -> list[Tlv]:
    out: list[Tlv] = []
    i = 0
    while i < len(data):
        tag = data[i]
        first = data[i + 1]
        if first < 0x80:
            length, i = first, i + 2
        else:
            k = first & 0x7F
            length = int.from_bytes(data[i + 2 : i + 2 + k], "big")
            i += 2 + k
        content = data[i : i + length]
        i += length
        # Descend into constructed nodes, and into OCTET STRINGs that hold DER (none here
        # but the JSON content, which stays primitive).
        out.append(Tlv(tag, children=_parse(content)) if tag & 0x20 else Tlv(tag, content))
    return out


def _nodes(roots: list[Tlv]) -> list[tuple[Tlv, list[Tlv]]]:
    """Every node with the list that holds it (its parent's children)."""
    found: list[tuple[Tlv, list[Tlv]]] = []

    def walk(siblings: list[Tlv]) -> None:
        for node in siblings:
            found.append((node, siblings))
            if node.children is not None:
                walk(node.children)

    walk(roots)
    return found


@pytest.fixture(scope="module")
def real_der() -> bytes:
    doc = json.loads(REAL_DOC.read_text())
    return base64.b64decode(doc["signature"])


def test_the_tlv_tree_round_trips(real_der: bytes) -> None:
    """The mutator's parser re-encodes the real document byte for byte."""
    assert b"".join(t.encode() for t in _parse(real_der)) == real_der
    assert len(_nodes(_parse(real_der))) > 100


MUTATIONS = [
    "drop",
    "duplicate",
    "swap",
    "retag",
    "random_content",
    "truncate_content",
    "long_length",
    "indefinite_length",
    "wrap",
    "insert_random",
    "empty",
]


def _mutate(roots: list[Tlv], data: st.DataObject) -> None:
    nodes = _nodes(roots)
    if not nodes:  # an earlier mutation dropped the root
        return
    node, siblings = nodes[data.draw(st.integers(0, len(nodes) - 1))]
    kind = data.draw(st.sampled_from(MUTATIONS))
    idx = next(i for i, s in enumerate(siblings) if s is node)
    if kind == "drop":
        siblings.pop(idx)
    elif kind == "duplicate":
        siblings.insert(idx, copy.deepcopy(node))
    elif kind == "swap" and len(siblings) > 1:
        j = data.draw(st.integers(0, len(siblings) - 1))
        siblings[idx], siblings[j] = siblings[j], siblings[idx]
    elif kind == "retag":
        node.tag = data.draw(st.integers(0, 255))
        if node.tag & 0x20 and node.children is None:
            node.children = []
        elif not node.tag & 0x20 and node.children is not None:
            node.content, node.children = b"".join(c.encode() for c in node.children), None
    elif kind == "random_content":
        node.children, node.content = None, data.draw(st.binary(max_size=64))
    elif kind == "truncate_content" and node.children is None:
        node.content = node.content[: data.draw(st.integers(0, len(node.content)))]
    elif kind == "long_length":
        node.length_form = "long"
    elif kind == "indefinite_length":
        node.length_form = "indefinite"
    elif kind == "wrap":
        siblings[idx] = Tlv(data.draw(st.sampled_from([0x30, 0x31, 0xA0, 0x04])), children=[node])
    elif kind == "insert_random":
        siblings.insert(idx, Tlv(data.draw(st.integers(0, 255)), data.draw(st.binary(max_size=32))))
    elif kind == "empty":
        node.children = [] if node.children is not None else None
        node.content = b""


def _parse_and_check(der: bytes) -> None:
    """parse_signed_data, then every synchronous step after it: only our errors."""
    try:
        view = parse_signed_data(der)
    except BadRequest as exc:
        assert exc.code == Code.ATTESTED_MALFORMED
        return
    try:
        signer = check_single_signer(view)
        cert = find_signer_certificate(view, signer)
        check_digest_algorithm(signer)
        check_signature(view, signer, cert)
        check_signer_name(cert, CLOUDS["public"])
        parse_content(view.content)
    except GatewayError:
        pass


@SETTINGS
@given(st.data())
def test_structured_mutations_of_a_real_document(real_der: bytes, data: st.DataObject) -> None:
    roots = _parse(real_der)
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(roots, data)
    _parse_and_check(b"".join(t.encode() for t in roots))


def test_the_unmutated_real_document_passes_the_sync_steps(real_der: bytes) -> None:
    """Control: the same steps accept the real document, so the mutations are what fail."""
    view = parse_signed_data(real_der)
    signer = check_single_signer(view)
    cert = find_signer_certificate(view, signer)
    check_digest_algorithm(signer)
    check_signature(view, signer, cert)
    assert check_signer_name(cert, CLOUDS["public"]) == "metadata.azure.com"
    parse_content(view.content)
