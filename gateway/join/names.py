"""Which names a joining VM's certificates may carry (issue 12 point 5): only verified ones.

A node's X.509 and SSH host certificates name it; before this module an admitted VM got
certificates for whatever names it asked for — another VM's name, the auth service's,
``localhost``, any IP. Now the token's name policy (``spec.azure`` in the token file)
decides, from verified attributes only (the signed attested document, the verified access
token and Resource Manager's VM record — never the request body or IMDS):

* **node name**: ``spec.azure.node_name``, a template; by default ``{vm_name}``, the VM's
  Azure name (a uniform scale-set instance: ``<scale set>_<instance id>``; a flexible
  scale set's VM is an ordinary VM with its own name). A request without ``node_name``
  gets it; a request naming it (ASCII case-insensitively) is accepted; any other name is
  refused.
* **extra names** (``additional_principals``, ``dns_names``): each must equal, after
  rendering, one of ``spec.azure.host_names`` (templates; exact match, ASCII
  case-insensitive), or the node name itself.
* **IP addresses** (a requested principal or DNS name that parses as an IP): only with
  ``spec.azure.host_ips: nic``, and only private IPs of the VM's own network interfaces
  as Resource Manager lists them — never loopback, link-local, unspecified, multicast or
  reserved addresses, even on a NIC.

Anything else is refused with ``403 name_not_allowed`` naming the first refused name —
never dropped silently. Everything here is pure: the pipeline's ``names`` step gathers
the attributes (and the NIC addresses, only when a request asks for an IP the token may
allow) and calls :func:`decide_names`.

Design decisions, each with its reason:

* Rendered names are **lowercased** (ASCII only, after checking the value is ASCII):
  DNS compares names case-insensitively but OpenSSH compares principals exactly, so one
  canonical spelling is what makes ``ssh web-1`` match a VM Azure calls ``Web-1``. A
  value with a non-ASCII character is refused, not folded: ``str.lower()`` maps the
  Kelvin sign onto ``k``, and a certificate must not name ``kube`` for a VM that is not.
* A template must use **at least one variable**: a literal name would be shared by every
  VM the token admits — exactly how one VM got the cluster's own names.
* **No globs** in ``host_names``: a pattern names one name per VM, so what a
  certificate can say is enumerable from the token file; ``*`` is a load-time error and
  never reaches a certificate.
* A rendered name must be a **hostname label sequence**: labels of ``a-z0-9-`` plus
  ``_`` inside a label (Azure's scale-set instance names ``ss_0``; such a name stays an
  SSH principal, the auth service puts only LDH names in dNSName SANs), 1..63 characters,
  not starting or ending with ``-``, at most 253 in all; no label of the reserved
  ``??--`` form (RFC 5890 §2.3.1: ``xn--`` punycode, whose Unicode form can look like
  another name); not all-numeric in its last label (a resolver may read ``10.5`` as an
  IPv4 address); not ``localhost`` nor under it (RFC 6761).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from gateway.azure.resource_id import azure_name_key
from gateway.core.errors import Code, JoinRejected
from gateway.protocol import HostParams

__all__ = [
    "ARM_VARIABLES",
    "DEFAULT_NODE_NAME",
    "HOST_IPS",
    "TEMPLATE_VARIABLES",
    "DecidedNames",
    "HostIps",
    "IpAddress",
    "NamePolicy",
    "NameTemplate",
    "VmAttributes",
    "decide_names",
    "is_certifiable_name",
    "parse_template",
    "requested_ips",
    "wants_nic_ips",
]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The variables a template may use, each a verified attribute, with where it comes from.
TEMPLATE_VARIABLES: Mapping[str, str] = {
    "vm_name": "the VM's Azure name (a uniform scale-set instance: <scale set>_<instance id>)",
    "scale_set": "the VM's scale set (uniform or flexible), from Resource Manager",
    "instance_id": "a uniform scale-set instance's ID",
    "resource_group": "the VM's resource group",
    "subscription": "the VM's subscription ID",
    "tenant": "the access token's tenant ID",
    "location": "the VM's region, from Resource Manager",
    "vm_id": "the attested document's vmId",
}
# Known only from Resource Manager: with azure.vm_binding off they are never set.
ARM_VARIABLES = frozenset({"location"})

HostIps = Literal["none", "nic"]
HOST_IPS: tuple[HostIps, ...] = ("none", "nic")

_LITERAL = re.compile(r"[A-Za-z0-9._-]*")
_VARIABLE = re.compile(r"\{([^{}]*)\}")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?")
_MAX_NAME = 253
# ASCII letters lowercased, every other character kept (the Kelvin sign stays itself).
_ascii_lower = azure_name_key


def is_certifiable_name(name: str) -> bool:
    """``name`` may appear in a certificate as a host name (see the module doc): lowercase
    ASCII hostname labels, no reserved ``??--`` label, not numeric-final, not localhost."""
    if not name or len(name) > _MAX_NAME or not name.isascii():
        return False
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return False
    if any(label[2:4] == "--" for label in labels):
        return False
    if labels[-1].isdigit():
        return False
    return labels[-1] != "localhost"


@dataclass(frozen=True)
class NameTemplate:
    """A parsed template: literal text and ``{variable}`` placeholders, in order."""

    text: str
    parts: tuple[tuple[bool, str], ...]  # (is_variable, literal text or variable name)

    @property
    def variables(self) -> frozenset[str]:
        return frozenset(v for is_var, v in self.parts if is_var)

    def render(self, attrs: VmAttributes) -> str | None:
        """The name for this VM, lowercased; None when a variable has no value for it or
        the result is not a certifiable name."""
        out: list[str] = []
        for is_var, value in self.parts:
            if not is_var:
                out.append(value)
                continue
            got = attrs.get(value)
            if not got:
                return None
            out.append(got)
        name = "".join(out)
        if not name.isascii():
            return None
        name = _ascii_lower(name)
        return name if is_certifiable_name(name) else None

    def __str__(self) -> str:
        return self.text


def parse_template(text: str) -> NameTemplate:
    """Parse a name template; ``ValueError`` says what is wrong (the token loader adds the
    file and line)."""
    parts: list[tuple[bool, str]] = []
    pos = 0
    for m in _VARIABLE.finditer(text):
        parts.append((False, _literal(text[pos : m.start()])))
        name = m.group(1)
        if name not in TEMPLATE_VARIABLES:
            raise ValueError(
                f"unknown placeholder {{{name}}} in {text!r} "
                f"(known: {', '.join('{' + v + '}' for v in TEMPLATE_VARIABLES)})"
            )
        parts.append((True, name))
        pos = m.end()
    parts.append((False, _literal(text[pos:])))
    kept = tuple(p for p in parts if p[0] or p[1])
    if not any(is_var for is_var, _ in kept):
        raise ValueError(
            f"{text!r} uses no placeholder: every VM the token admits would get that name"
        )
    return NameTemplate(text=text, parts=kept)


def _literal(chunk: str) -> str:
    if "{" in chunk or "}" in chunk:
        raise ValueError(f"unbalanced brace in {chunk!r}")
    if "*" in chunk:
        raise ValueError(
            "a name pattern is exact: '*' is not allowed (list each name; a certificate "
            "never carries a wildcard)"
        )
    if not _LITERAL.fullmatch(chunk):
        raise ValueError(f"{chunk!r}: a name may hold only letters, digits, '.', '-' and '_'")
    return chunk


DEFAULT_NODE_NAME = parse_template("{vm_name}")


@dataclass(frozen=True)
class NamePolicy:
    """A token's name policy (``spec.azure.node_name``, ``host_names``, ``host_ips``)."""

    node_name: NameTemplate = DEFAULT_NODE_NAME
    host_names: tuple[NameTemplate, ...] = ()
    host_ips: HostIps = "none"

    @property
    def variables(self) -> frozenset[str]:
        return self.node_name.variables.union(*(t.variables for t in self.host_names))

    def describe(self) -> str:
        """The policy in words (``check-config``, ``rules explain``)."""
        node = (
            "the VM's Azure name"
            if self.node_name == DEFAULT_NODE_NAME
            else f"{self.node_name.text!r}"
        )
        extra = (
            "also " + ", ".join(repr(t.text) for t in self.host_names)
            if self.host_names
            else "no other names"
        )
        ips = (
            "IPs: the private IPs of the VM's own network interfaces"
            if self.host_ips == "nic"
            else "no IPs"
        )
        return f"node name {node}; {extra}; {ips}"


@dataclass(frozen=True)
class VmAttributes:
    """The verified attributes templates render from (None: not known for this VM)."""

    vm_name: str | None
    scale_set: str | None
    instance_id: str | None
    resource_group: str | None
    subscription: str | None
    tenant: str | None
    location: str | None
    vm_id: str | None

    def get(self, name: str) -> str | None:
        value = getattr(self, name)
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class DecidedNames:
    """What the certificates will name: the node name, the extra host names (principals
    and DNS names as the request listed them, lowercased) and the IPs (canonical text)."""

    node_name: str
    principals: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()

    def apply(self, host: HostParams) -> HostParams:
        """The host block to register: the request's keys and proofs, the decided names
        (IPs travel as principals; the auth service makes them iPAddress SANs)."""
        return replace(
            host,
            node_name=self.node_name,
            additional_principals=self.principals + self.ips,
            dns_names=self.dns_names,
        )


def _as_ip(value: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def requested_ips(host: HostParams) -> tuple[IpAddress, ...]:
    """Every requested extra name that is an IP literal, in either list."""
    out = []
    for value in (*host.additional_principals, *host.dns_names):
        ip = _as_ip(value)
        if ip is not None:
            out.append(ip)
    return tuple(out)


def wants_nic_ips(policy: NamePolicy, host: HostParams) -> bool:
    """Whether deciding needs the VM's NIC addresses: the token allows NIC IPs and the
    request asks for at least one IP (otherwise Resource Manager is not asked)."""
    return policy.host_ips == "nic" and bool(requested_ips(host))


def _never_certified(ip: IpAddress) -> bool:
    """Addresses no node certificate may carry, whatever a NIC says: they name every
    machine (loopback, unspecified), a link (link-local: Azure's 169.254.169.254 is IMDS),
    a group (multicast), or nothing routable (reserved); an IPv4-mapped IPv6 address is
    refused too, so an IPv4 check cannot be sidestepped."""
    if isinstance(ip, ipaddress.IPv6Address) and (
        ip.ipv4_mapped is not None or ip.sixtofour is not None or ip.teredo is not None
    ):
        return True
    return (
        ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast or ip.is_reserved
    )


def _refuse(name: str, why: str) -> JoinRejected:
    return JoinRejected(Code.NAME_NOT_ALLOWED, f"name {name[:100]!r} not allowed: {why}")


def decide_names(
    policy: NamePolicy,
    attrs: VmAttributes,
    host: HostParams,
    *,
    nic_ips: Collection[IpAddress] | None = None,
) -> DecidedNames:
    """The names this VM's certificates carry, or ``JoinRejected(NAME_NOT_ALLOWED)``
    naming the first requested name the policy does not give it.

    ``nic_ips``: the private IPs of the VM's network interfaces (only needed when
    :func:`wants_nic_ips`); None means not read, and every IP is refused."""
    node = policy.node_name.render(attrs)
    if node is None:
        raise _refuse(
            host.node_name or policy.node_name.text,
            f"the node name template {policy.node_name.text!r} gives this VM no valid "
            "hostname (a variable it lacks, or a value that is not a hostname)",
        )
    if host.node_name and _ascii_lower(host.node_name) != node:
        raise _refuse(host.node_name, f"this VM's node name is {node!r}")
    allowed = {node}
    for template in policy.host_names:
        rendered = template.render(attrs)
        if rendered is not None:
            allowed.add(rendered)
    nics = frozenset(nic_ips or ())

    def decide(value: str) -> tuple[str, bool]:
        ip = _as_ip(value)
        if ip is None:
            name = _ascii_lower(value)
            if name not in allowed:
                raise _refuse(value, "not among the names the token's policy gives this VM")
            return name, False
        if policy.host_ips != "nic":
            raise _refuse(value, "the token allows no IP addresses (spec.azure.host_ips)")
        if _never_certified(ip):
            raise _refuse(value, "loopback, link-local, multicast or reserved address")
        if ip not in nics:
            raise _refuse(value, "not a private IP of this VM's network interfaces")
        return str(ip), True

    principals: list[str] = []
    dns_names: list[str] = []
    ips: list[str] = []
    for source, sink in ((host.additional_principals, principals), (host.dns_names, dns_names)):
        for value in source:
            name, is_ip = decide(value)
            target = ips if is_ip else sink
            if name not in target:
                target.append(name)
    return DecidedNames(
        node_name=node, principals=tuple(principals), dns_names=tuple(dns_names), ips=tuple(ips)
    )
