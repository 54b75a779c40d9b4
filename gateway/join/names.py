"""What a node's certificates may name: only what was verified, or what the token allows.

An independent attack showed any admitted VM obtaining certificates for any name it asked
for (``vm-a`` got ``vm-b``, ``auth.cluster.internal``, ``localhost``, ``10.0.0.5``). Here:

* the **node name** is the VM's Azure name (a uniform scale-set instance:
  ``<scale set>_<instance id>``), unless the token sets ``spec.azure.node_name``, a template
  over the verified attributes (``"{vm_name}.{resource_group}.internal"``). A node that asks
  for another node name is refused; asking for none (or for exactly this one) is fine;
* **additional principals and DNS names** are allowed only when they equal one of the
  token's ``spec.azure.host_names`` templates rendered with the verified attributes
  (``"{vm_name}.prod.internal"``) — compared as DNS compares names, ASCII case-insensitively;
* **IP addresses** are never taken from the request (issuing them from the VM's own network
  interfaces is not built yet: an IP literal is refused like any name outside the policy).

A requested name outside the policy is refused with ``403 name_not_allowed`` — never dropped
silently, so an operator sees why a node lacks the name it expected. Templates may use
``{vm_name}``, ``{resource_group}``, ``{subscription}``, ``{location}``, ``{scale_set}``,
``{instance_id}`` and ``{vm_id}``; a rendered name must still be a plain DNS name (LDH labels,
no wildcard, no IDNA ``xn--`` label, at most 253 characters) or it is not issued at all.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.core.errors import Code, JoinRejected

__all__ = [
    "TEMPLATE_FIELDS",
    "HostNamePolicy",
    "NodeNames",
    "VerifiedNames",
    "check_template",
    "decide_names",
]

TEMPLATE_FIELDS = frozenset(
    {"vm_name", "resource_group", "subscription", "location", "scale_set", "instance_id", "vm_id"}
)
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_MAX_NAME = 253
_MAX_REQUESTED = 32  # names one node may ask for


def check_template(template: str) -> str | None:
    """Why ``template`` is not a usable name template (None when it is)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        return f"not a template: {exc}"
    unknown = [f for f in fields if f not in TEMPLATE_FIELDS]
    if unknown:
        return f"unknown field {unknown[0]!r} (one of {', '.join(sorted(TEMPLATE_FIELDS))})"
    if "*" in template:
        return "no wildcards: a certificate names hosts, not patterns"
    return None


@dataclass(frozen=True)
class HostNamePolicy:
    """A token's ``spec.azure`` naming keys (``None``/empty: the defaults above)."""

    node_name: str | None = None
    host_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifiedNames:
    """The verified attributes templates may use (from the document, token and ARM)."""

    vm_name: str
    resource_group: str
    subscription: str
    vm_id: str
    location: str = ""
    scale_set: str = ""
    instance_id: str = ""

    def render(self, template: str) -> str:
        return template.format_map(
            {
                "vm_name": self.vm_name,
                "resource_group": self.resource_group,
                "subscription": self.subscription,
                "location": self.location,
                "scale_set": self.scale_set,
                "instance_id": self.instance_id,
                "vm_id": self.vm_id,
            }
        )


@dataclass(frozen=True)
class NodeNames:
    """The names the auth service will certify (besides the host ID it assigns)."""

    node_name: str
    additional_principals: tuple[str, ...]
    dns_names: tuple[str, ...]


def _dns_fold(name: str) -> str:
    return name.rstrip(".").translate(_ASCII_LOWER)


def _plain_dns_name(name: str) -> bool:
    """LDH labels only (after ASCII folding), no wildcard, no IDNA, at most 253 chars."""
    folded = _dns_fold(name)
    if not folded or len(folded) > _MAX_NAME or not folded.isascii():
        return False
    labels = folded.split(".")
    return all(_LABEL.fullmatch(lb) and not lb.startswith("xn--") for lb in labels)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _refuse(name: str, why: str) -> JoinRejected:
    shown = name[:80] + ("…" if len(name) > 80 else "")
    return JoinRejected(Code.NAME_NOT_ALLOWED, f"requested name {shown!r}: {why}")


def decide_names(
    policy: HostNamePolicy,
    verified: VerifiedNames,
    *,
    requested_node_name: str,
    requested_principals: Iterable[str],
    requested_dns_names: Iterable[str],
) -> NodeNames:
    """The names to certify, or ``JoinRejected(NAME_NOT_ALLOWED)`` for the first requested
    name the policy does not allow."""
    principals, dns_names = tuple(requested_principals), tuple(requested_dns_names)
    node_name = verified.render(policy.node_name) if policy.node_name else verified.vm_name
    if not _plain_dns_name(node_name) and policy.node_name:
        # An operator's template rendered into something no certificate should carry.
        raise _refuse(node_name, "the token's node_name template renders no plain DNS name")
    if requested_node_name and _dns_fold(requested_node_name) != _dns_fold(node_name):
        raise _refuse(requested_node_name, f"the node name is {node_name!r} for this VM")
    allowed = {_dns_fold(node_name): node_name}
    for template in policy.host_names:
        name = verified.render(template)
        if _plain_dns_name(name):
            allowed[_dns_fold(name)] = name
    if len(principals) + len(dns_names) > _MAX_REQUESTED:
        raise _refuse(
            (principals + dns_names)[0], f"at most {_MAX_REQUESTED} names may be requested"
        )
    for name in principals + dns_names:
        if _is_ip(name):
            raise _refuse(name, "IP addresses are not issued from the request")
        if not _plain_dns_name(name):
            raise _refuse(name, "not a plain DNS name (wildcards and IDNA are never issued)")
        if _dns_fold(name) not in allowed:
            raise _refuse(name, "not among the token's spec.azure.host_names")
    return NodeNames(
        node_name=node_name,
        additional_principals=tuple(allowed[_dns_fold(p)] for p in principals),
        dns_names=tuple(allowed[_dns_fold(d)] for d in dns_names),
    )
