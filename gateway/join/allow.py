"""Allow rules: a compatible superset of Teleport's ``spec.azure.allow`` entries.

A rule has optional fields; every field it sets must match (AND), a list matches when any
of its values does (OR), and a token's first matching rule wins. Teleport's three fields
keep their meaning, so a Teleport token file means the same here:

==================  =====================================================================
``tenant``          the token's ``tid`` (GUID)
``subscription``    the VM's subscription (GUID)
``resource_groups`` the VM's resource group — globs (``*``, ``?``)
``locations``       the VM's Azure region (``westeurope``)                    [ARM]
``scale_sets``      the VM's scale set, uniform or flexible — globs           [ARM]
``vm_names``        the VM's name (a uniform instance: ``<set>_<id>``) — globs [ARM]
``identities``      the managed identity that joined: the token's ``oid`` (principal object
                    ID) or ``appid`` (client ID) — GUIDs
``tags``            ``{key: value or [values]}``: the VM's tag ``key`` has one of the values
                    (tag keys as Azure compares them, values exactly)            [ARM]
==================  =====================================================================

Names compare the way Azure compares them: ASCII case-insensitively, and exactly for
anything outside ASCII (``str.casefold`` would fold U+212A KELVIN SIGN onto ``k`` and
``ß`` onto ``ss`` — Resource Manager does not, so neither do we). A glob is ``*`` (any
run, possibly empty) and ``?`` (one character) and nothing else — never a regular
expression — and is matched in O(len(pattern)·len(name)) without backtracking blow-ups.

Facts come only from verified evidence — the signed document, the verified token and
Resource Manager's answer — never from the request body. Fields marked [ARM] need the VM
as Resource Manager returns it: a token using them while ``azure.vm_binding`` is off is a
configuration error. Before Resource Manager is asked, the rules are evaluated on what the
signed token alone establishes (tenant, subscription, resource group, identities): a VM no
rule can admit is refused without any ARM call; after ARM answers, they are evaluated again
on everything.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from gateway.azure.resource_id import azure_name_key, same_azure_name

__all__ = [
    "ARM_FIELDS",
    "FIELD_ORDER",
    "AllowRule",
    "Glob",
    "RuleCheck",
    "Verdict",
    "VmFacts",
    "evaluate",
]

# The order in which a rule's fields are checked, and in which ``explain`` reports the
# first one that did not match.
FIELD_ORDER: tuple[str, ...] = (
    "tenant",
    "subscription",
    "resource_groups",
    "identities",
    "locations",
    "scale_sets",
    "vm_names",
    "tags",
)
ARM_FIELDS = frozenset({"locations", "scale_sets", "vm_names", "tags"})


@dataclass(frozen=True)
class Glob:
    """``*`` and ``?`` over Azure-folded text; anything else is literal."""

    pattern: str
    _folded: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_folded", azure_name_key(self.pattern))

    @property
    def is_literal(self) -> bool:
        return "*" not in self.pattern and "?" not in self.pattern

    def matches(self, name: str) -> bool:
        return _wildcard(self._folded, azure_name_key(name))

    def __str__(self) -> str:
        return self.pattern


def _wildcard(pattern: str, text: str) -> bool:
    # The classic greedy matcher: remember the last '*' and retry from one character
    # further on a mismatch. Linear in practice, O(len(p)·len(t)) at worst — no regex.
    p = t = 0
    star = -1
    mark = 0
    while t < len(text):
        if p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
            p += 1
            t += 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark = p, t
            p += 1
        elif star >= 0:
            p = star + 1
            mark += 1
            t = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


@dataclass(frozen=True)
class VmFacts:
    """What verified evidence says about the joining VM. ``None`` means "not known":
    before Resource Manager answered, or with ``azure.vm_binding`` off.

    * scale_set — the scale set's name; ``""`` when the VM is in none.
    * identities — lowercase GUIDs of the identity that joined (token ``oid``, ``appid``).
    """

    tenant: str
    subscription: str
    resource_group: str
    identities: frozenset[str] = frozenset()
    location: str | None = None
    scale_set: str | None = None
    vm_name: str | None = None
    tags: Mapping[str, str] | None = None


class Verdict(enum.Enum):
    MATCH = "match"
    NO_MATCH = "no_match"
    UNKNOWN = "unknown"  # no field failed, but one needs facts not known yet


@dataclass(frozen=True)
class RuleCheck:
    """One rule's outcome: for a miss, the first field (in ``FIELD_ORDER``) that did not
    match — or, for ``UNKNOWN``, that needs facts not known yet — and the VM's value."""

    verdict: Verdict
    field: str | None = None
    actual: str | None = None


@dataclass(frozen=True)
class AllowRule:
    """One ``spec.azure.allow`` entry. GUIDs are stored lowercase."""

    subscription: str | None = None
    resource_groups: tuple[Glob | str, ...] = ()
    tenant: str | None = None
    locations: tuple[str, ...] = ()
    scale_sets: tuple[Glob | str, ...] = ()
    vm_names: tuple[Glob | str, ...] = ()
    identities: tuple[str, ...] = ()
    tags: tuple[tuple[str, tuple[str, ...]], ...] = ()
    source: str = field(default="", compare=False)  # "file:line"

    def __post_init__(self) -> None:
        # Plain strings are accepted for the glob fields (tests, Teleport-shaped callers).
        for name in ("resource_groups", "scale_sets", "vm_names"):
            values = getattr(self, name)
            if any(isinstance(v, str) for v in values):
                object.__setattr__(
                    self, name, tuple(Glob(v) if isinstance(v, str) else v for v in values)
                )

    @cached_property  # read by every check of every join; the rule never changes
    def fields(self) -> tuple[str, ...]:
        """The fields this rule sets, in ``FIELD_ORDER``."""
        return tuple(f for f in FIELD_ORDER if getattr(self, f) not in (None, ()))

    @property
    def needs_arm(self) -> bool:
        return any(f in ARM_FIELDS for f in self.fields)

    def check(self, facts: VmFacts) -> RuleCheck:
        unknown: RuleCheck | None = None
        for name in self.fields:
            outcome = _CHECKS[name](self, facts)
            if outcome.verdict is Verdict.NO_MATCH:
                return outcome
            if outcome.verdict is Verdict.UNKNOWN and unknown is None:
                unknown = outcome
        return unknown or RuleCheck(Verdict.MATCH)

    def describe(self) -> str:
        """The rule in words (``check-config``)."""
        parts = [_DESCRIBE[name](self) for name in self.fields]
        return "admit a VM whose " + ", and whose ".join(parts)


def _no(name: str, actual: str) -> RuleCheck:
    return RuleCheck(Verdict.NO_MATCH, name, actual)


def _unknown(name: str) -> RuleCheck:
    return RuleCheck(Verdict.UNKNOWN, name, None)


_OK = RuleCheck(Verdict.MATCH)


def _check_tenant(rule: AllowRule, facts: VmFacts) -> RuleCheck:
    return _OK if rule.tenant == facts.tenant.lower() else _no("tenant", facts.tenant)


def _check_subscription(rule: AllowRule, facts: VmFacts) -> RuleCheck:
    if rule.subscription == facts.subscription.lower():
        return _OK
    return _no("subscription", facts.subscription)


def _globs(name: str, globs: tuple[Glob | str, ...], value: str | None) -> RuleCheck:
    if value is None:
        return _unknown(name)
    ok = any(isinstance(g, Glob) and g.matches(value) for g in globs)
    return _OK if ok else _no(name, value)


def _check_groups(rule: AllowRule, facts: VmFacts) -> RuleCheck:
    return _globs("resource_groups", rule.resource_groups, facts.resource_group)


def _check_scale_sets(rule: AllowRule, facts: VmFacts) -> RuleCheck:
    if facts.scale_set == "":
        return _no("scale_sets", "(not in a scale set)")
    return _globs("scale_sets", rule.scale_sets, facts.scale_set)


def _check_vm_names(rule: AllowRule, facts: VmFacts) -> RuleCheck:
    return _globs("vm_names", rule.vm_names, facts.vm_name)


def _check_locations(rule: AllowRule, facts: VmFacts) -> RuleCheck:
    if facts.location is None:
        return _unknown("locations")
    ok = any(same_azure_name(loc, facts.location) for loc in rule.locations)
    return _OK if ok else _no("locations", facts.location)


def _check_identities(rule: AllowRule, facts: VmFacts) -> RuleCheck:
    if facts.identities & set(rule.identities):
        return _OK
    return _no("identities", ", ".join(sorted(facts.identities)) or "(none)")


def _check_tags(rule: AllowRule, facts: VmFacts) -> RuleCheck:
    if facts.tags is None:
        return _unknown("tags")
    folded = {azure_name_key(k): v for k, v in facts.tags.items()}
    for key, values in rule.tags:
        value = folded.get(azure_name_key(key))
        if value is None or value not in values:
            return _no("tags", f"{key}={value}" if value is not None else f"{key} (not set)")
    return _OK


_CHECKS = {
    "tenant": _check_tenant,
    "subscription": _check_subscription,
    "resource_groups": _check_groups,
    "identities": _check_identities,
    "locations": _check_locations,
    "scale_sets": _check_scale_sets,
    "vm_names": _check_vm_names,
    "tags": _check_tags,
}


def _any_of(values: tuple[object, ...]) -> str:
    shown = [str(v) for v in values]
    return shown[0] if len(shown) == 1 else "one of " + ", ".join(shown)


_DESCRIBE = {
    "tenant": lambda r: f"tenant is {r.tenant}",
    "subscription": lambda r: f"subscription is {r.subscription}",
    "resource_groups": lambda r: f"resource group is {_any_of(r.resource_groups)}",
    "identities": lambda r: f"managed identity (object or client ID) is {_any_of(r.identities)}",
    "locations": lambda r: f"location is {_any_of(r.locations)}",
    "scale_sets": lambda r: f"scale set is {_any_of(r.scale_sets)}",
    "vm_names": lambda r: f"name is {_any_of(r.vm_names)}",
    "tags": lambda r: "tags have "
    + " and ".join(f"{k} = {_any_of(v)}" for k, v in r.tags),
}


def evaluate(rules: tuple[AllowRule, ...], facts: VmFacts) -> tuple[int | None, list[RuleCheck]]:
    """Check ``rules`` in order: the index of the first that matches (or None) and every
    rule's outcome up to it (for ``explain`` and the audit record)."""
    checks: list[RuleCheck] = []
    for index, rule in enumerate(rules):
        outcome = rule.check(facts)
        checks.append(outcome)
        if outcome.verdict is Verdict.MATCH:
            return index, checks
    return None, checks
