"""The field rules of both APIs, each defined once: GUIDs, names, roles, keys, sizes.

The gateway applies them to a join request, the auth service applies them again to the
registration it is sent (it is the last line before a CA signs, so it trusts no encoder),
and the agent and the Azure checks use the same GUID rule. Every pattern is anchored with
``\\A``/``\\Z`` and applied with ``fullmatch``: with ``re.match`` and ``$``, "web-1\\n" or a
vmId ending in a newline passed, because ``$`` also matches before a trailing newline.

Everything here is pure — values in, a bool or a :class:`WireError` out — but for a bounded
memo of the public keys the checks accepted, by their exact bytes (see ``_keep``).
"""

from __future__ import annotations

import binascii
import contextlib
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key, load_ssh_public_key

from gateway.protocol.errors import Code, WireError

__all__ = [
    "GUID_RE",
    "HOST_ROLES",
    "MAX_DNS_NAME",
    "MAX_NAMES",
    "MAX_NODE_NAME",
    "MAX_ROLE",
    "MAX_SSH_KEY",
    "MAX_TLS_KEY",
    "MAX_TOKEN_NAME",
    "MIN_RSA_BITS",
    "TOKEN_ROLES",
    "canonical_role",
    "check_key_strength",
    "check_ssh_public_key",
    "check_tls_public_key",
    "checked_ssh_key",
    "checked_tls_key",
    "invalid",
    "is_dns_name",
    "is_guid",
    "is_node_name",
    "is_principal",
    "is_token_name",
    "load_ssh_key",
    "normalize_guid",
    "optional_str_list",
    "require_fields",
    "require_str",
]

# --- sizes ----------------------------------------------------------------------------------

MAX_TOKEN_NAME = 254
MAX_NODE_NAME = 253
MAX_DNS_NAME = 253
MAX_ROLE = 32
# An OpenSSH line for RSA-8192 is ~1.4 KiB and its PEM SPKI ~1.5 KiB: room, not a hole.
MAX_SSH_KEY = 4096
MAX_TLS_KEY = 8192
# additional_principals and dns_names, each.
MAX_NAMES = 32
MIN_RSA_BITS = 2048
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)

# --- GUIDs ----------------------------------------------------------------------------------

# Azure's tenant, subscription, vmId and client IDs: 8-4-4-4-12 hex, either case.
GUID_RE = re.compile(
    r"\A[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z"
)


def is_guid(value: object) -> TypeGuard[str]:
    """``value`` is a string in 8-4-4-4-12 hex form, nothing before or after (no newline)."""
    return isinstance(value, str) and GUID_RE.fullmatch(value) is not None


def normalize_guid(value: object) -> str | None:
    """The lowercase GUID, or None when ``value`` is not a GUID string."""
    return value.lower() if is_guid(value) else None


# --- names ----------------------------------------------------------------------------------

_TOKEN_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:@-]{0,253}\Z")
# RFC 1123 host label characters; node names are hostnames in Teleport.
_NODE_NAME = re.compile(r"\A[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?\Z")
# additional_principals: hostnames or IP addresses (v4, v6) — what Teleport puts in certs.
_PRINCIPAL = re.compile(r"\A[A-Za-z0-9:.-]{1,253}\Z")
# dns_names become dNSName SANs: LDH labels, no wildcard, no trailing dot (RFC 5280 §4.2.1.6
# wants the preferred name syntax, which has none).
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"\A{_DNS_LABEL}(?:\.{_DNS_LABEL})*\Z")


def is_token_name(value: str) -> bool:
    return _TOKEN_NAME.fullmatch(value) is not None


def is_node_name(value: str) -> bool:
    return _NODE_NAME.fullmatch(value) is not None


def is_principal(value: str) -> bool:
    return _PRINCIPAL.fullmatch(value) is not None


def is_dns_name(value: str) -> bool:
    """A hostname an X.509 dNSName may carry (LDH labels, no wildcard, at most 253)."""
    return len(value) <= MAX_DNS_NAME and _DNS_NAME.fullmatch(value) is not None


# --- roles ----------------------------------------------------------------------------------

# Teleport's system roles a provision token may list (``types.SystemRoles`` accepted on a
# ProvisionTokenV2), as Teleport spells them: a token file written for Teleport loads here
# unchanged, whatever roles it grants.
TOKEN_ROLES: tuple[str, ...] = (
    "Node",
    "Proxy",
    "Kube",
    "App",
    "Db",
    "WindowsDesktop",
    "Discovery",
    "Bot",
    "Instance",
    "MDM",
    "Okta",
)
# The roles a join may ask for: every token role that names a *host*. The auth service
# issues host identities (an SSH host certificate and an X.509 certificate with O=<role>),
# which is what Teleport gives the processes running those services — Okta and MDM (Jamf)
# are services of a teleport process like Db or Kube. ``Bot`` is the exception: a bot
# (tbot) gets a user-style identity through its own join flow, never a host certificate,
# so a host certificate saying "Bot" would be an identity no Teleport component expects.
HOST_ROLES: tuple[str, ...] = tuple(r for r in TOKEN_ROLES if r != "Bot")
_ROLE_BY_LOWER = {r.lower(): r for r in TOKEN_ROLES}


def canonical_role(name: str) -> str | None:
    """Teleport's spelling of a token role named in any case (token files write ``node``)."""
    return _ROLE_BY_LOWER.get(name.lower())


# --- keys -----------------------------------------------------------------------------------


def check_ssh_public_key(value: str, where: str) -> None:
    """One OpenSSH public key line (surrounding whitespace allowed) of a supported type.

    The rules are the reference auth service's: Ed25519, ECDSA on P-256/384/521 or RSA of at
    least 2048 bits. The gateway checks them before any costly step, so a key the auth
    service would refuse never spends ARM budget and a challenge to come back as a 502."""
    if len(value) > MAX_SSH_KEY:
        raise invalid(f"{where} must be at most {MAX_SSH_KEY} characters")
    if "\n" in value.strip() or "\r" in value:
        raise invalid(f"{where} must be one OpenSSH public key line")
    try:
        key = load_ssh_key(line := value.strip().encode("ascii"))
    except (ValueError, UnicodeEncodeError, TypeError, UnsupportedAlgorithm) as exc:
        raise invalid(f"{where} is not a supported OpenSSH public key") from exc
    check_key_strength(key, where)
    _keep(_ssh_keys, line, key)


# What ``load_ssh_public_key`` matches first (cryptography's ``_SSH_PUBKEY_RC``): the key
# type and the base64 blob, then anything (a comment) or nothing.
_SSH_LINE = re.compile(rb"\A(\S+)[ \t]+(\S+)")
_ED25519_TYPE = b"ssh-ed25519"
# The RFC 8709 public key blob up to the key: string "ssh-ed25519", then the length (32)
# of the string that holds the key.
_ED25519_PREFIX = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20"
_ED25519_BLOB = len(_ED25519_PREFIX) + 32


def load_ssh_key(line: bytes) -> object:
    """``load_ssh_public_key(line)``, with a short cut for the key every agent sends.

    cryptography's OpenSSH parser is pure Python (~5 µs a key); in a join storm every VM
    has its own key, so no memo helps. A plain ``ssh-ed25519`` line whose blob is exactly
    RFC 8709's (the type, a 32-byte key, nothing after) is the one shape that parser
    accepts for that type, and it does exactly this with it: the same line pattern, the
    same lenient base64 decoder, ``Ed25519PublicKey.from_public_bytes`` of the 32 bytes.
    Every other line — other types, certificates, any other blob — goes to the parser
    itself, so what is accepted and refused (and why) is unchanged."""
    match = _SSH_LINE.match(line)
    if match is not None and match.group(1) == _ED25519_TYPE:
        try:
            blob = binascii.a2b_base64(match.group(2))
        except binascii.Error:
            blob = b""  # the parser refuses it, with its own message
        if len(blob) == _ED25519_BLOB and blob.startswith(_ED25519_PREFIX):
            return ed25519.Ed25519PublicKey.from_public_bytes(blob[len(_ED25519_PREFIX) :])
    return load_ssh_public_key(line)


def check_tls_public_key(value: str, where: str) -> None:
    """A PEM SubjectPublicKeyInfo of a supported type (as for SSH keys)."""
    if len(value) > MAX_TLS_KEY:
        raise invalid(f"{where} must be at most {MAX_TLS_KEY} characters")
    if "-----BEGIN PUBLIC KEY-----" not in value:
        raise invalid(f"{where} must be a PEM SubjectPublicKeyInfo")
    try:
        key = load_pem_public_key(pem := value.encode("ascii"))
    except (ValueError, UnicodeEncodeError, TypeError, UnsupportedAlgorithm) as exc:
        raise invalid(f"{where} is not a supported PEM public key") from exc
    check_key_strength(key, where)
    _keep(_tls_keys, pem, key)


# The keys the two checks above loaded and accepted, by the exact bytes they loaded, so
# that the proof-of-possession checks of the same join (``possession.py``) do not load
# them again. Bounded (oldest out first); a key not found here is simply loaded again.
# An OrderedDict, not a dict: in a storm every join adds a key and drops the oldest, and
# a dict's ``next(iter())`` walks over the slots its deletions left at the front (~1 µs
# at this size); ``popitem(last=False)`` does not.
_MAX_KEPT_KEYS = 1024
_ssh_keys: OrderedDict[bytes, object] = OrderedDict()
_tls_keys: OrderedDict[bytes, object] = OrderedDict()


def _keep(kept: OrderedDict[bytes, object], text: bytes, key: object) -> None:
    if len(kept) >= _MAX_KEPT_KEYS and text not in kept:
        with contextlib.suppress(KeyError):  # emptied by another thread meanwhile
            kept.popitem(last=False)
    kept[text] = key


def checked_ssh_key(line: bytes) -> object | None:
    """The key ``check_ssh_public_key`` loaded from exactly ``line`` (and accepted), if
    still kept: what ``load_ssh_public_key(line)`` would give."""
    return _ssh_keys.get(line)


def checked_tls_key(pem: bytes) -> object | None:
    """The key ``check_tls_public_key`` loaded from exactly ``pem`` (and accepted), if
    still kept: what ``load_pem_public_key(pem)`` would give."""
    return _tls_keys.get(pem)


def check_key_strength(key: object, where: str) -> None:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise invalid(f"{where}: RSA keys must be at least {MIN_RSA_BITS} bits")
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _EC_CURVES):
            raise invalid(f"{where}: EC keys must be on P-256, P-384 or P-521")
        return
    raise invalid(f"{where}: key type not supported (Ed25519, ECDSA or RSA)")


# --- decoding helpers shared by the two APIs -------------------------------------------------


def invalid(message: str) -> WireError:
    return WireError(Code.INVALID_REQUEST, message)


def require_fields(
    obj: Mapping[str, Any], allowed: frozenset[str], required: frozenset[str], where: str
) -> None:
    """Unknown fields and missing required ones are refused (the message names them)."""
    unknown = set(obj) - allowed
    if unknown:
        raise invalid(f"unknown field(s) in {where}: {', '.join(sorted(unknown))[:200]}")
    missing = required - set(obj)
    if missing:
        raise invalid(f"missing field(s) in {where}: {', '.join(sorted(missing))}")


def require_str(
    obj: Mapping[str, Any], key: str, where: str, *, max_len: int, min_len: int = 1
) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise invalid(f"{where}.{key} must be a string")
    if not min_len <= len(value) <= max_len:
        raise invalid(f"{where}.{key} must be {min_len}..{max_len} characters")
    return value


def optional_str_list(
    obj: Mapping[str, Any], key: str, where: str, *, rule: Callable[[str], bool]
) -> tuple[str, ...]:
    """A list of at most :data:`MAX_NAMES` strings each passing ``rule`` (absent: empty)."""
    value = obj.get(key, [])
    if not isinstance(value, list):
        raise invalid(f"{where}.{key} must be a list")
    if len(value) > MAX_NAMES:
        raise invalid(f"{where}.{key} has more than {MAX_NAMES} items")
    for item in value:
        if not isinstance(item, str) or not rule(item):
            raise invalid(f"{where}.{key} items must be names or addresses")
    return tuple(value)
