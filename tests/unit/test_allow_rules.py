"""The allow-rule fields beyond Teleport's (gateway/join/allow.py, parsed by rules.py).

Tables: each field matching and not, globs, Azure's case rules (Unicode look-alikes stay
different), AND within a rule and OR within a list, first match wins, the partial
evaluation before Resource Manager, and the configuration errors with file and line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.azure.resource_id import same_azure_name
from gateway.core.config import ConfigError
from gateway.core.errors import Code, JoinRejected
from gateway.join.allow import AllowRule, Glob, Verdict, VmFacts
from gateway.join.rules import (
    load_token_files,
    match_allow_rules,
    refuse_unless_any_rule_can_match,
)

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
SUB = "11111111-1111-1111-1111-111111111111"
OTHER_SUB = "22222222-2222-2222-2222-222222222222"
CLIENT_ID = "aaaaaaaa-0000-0000-0000-000000000001"
OBJECT_ID = "bbbbbbbb-0000-0000-0000-000000000002"


def facts(**kw: object) -> VmFacts:
    base: dict[str, object] = {
        "tenant": TENANT,
        "subscription": SUB,
        "resource_group": "web",
        "identities": frozenset({CLIENT_ID, OBJECT_ID}),
        "location": "westeurope",
        "scale_set": "",
        "vm_name": "web-1",
        "tags": {"env": "prod", "team": "infra"},
    }
    base.update(kw)
    return VmFacts(**base)  # type: ignore[arg-type]


RULE_CASES: list[tuple[str, AllowRule, VmFacts, Verdict, str | None]] = [
    (
        "a subscription rule admits its VM",
        AllowRule(subscription=SUB),
        facts(),
        Verdict.MATCH,
        None,
    ),
    (
        "another subscription is refused at the subscription field",
        AllowRule(subscription=OTHER_SUB),
        facts(),
        Verdict.NO_MATCH,
        "subscription",
    ),
    (
        "a location matches case-insensitively",
        AllowRule(subscription=SUB, locations=("WestEurope",)),
        facts(),
        Verdict.MATCH,
        None,
    ),
    (
        "another location is refused",
        AllowRule(subscription=SUB, locations=("eastus", "northeurope")),
        facts(),
        Verdict.NO_MATCH,
        "locations",
    ),
    (
        "any of the listed locations matches (OR)",
        AllowRule(subscription=SUB, locations=("eastus", "westeurope")),
        facts(),
        Verdict.MATCH,
        None,
    ),
    (
        "a vm_names glob with * matches",
        AllowRule(subscription=SUB, vm_names=("web-*",)),
        facts(),
        Verdict.MATCH,
        None,
    ),
    (
        "a vm_names glob with ? matches exactly one character",
        AllowRule(subscription=SUB, vm_names=("web-?",)),
        facts(vm_name="web-12"),
        Verdict.NO_MATCH,
        "vm_names",
    ),
    (
        "a glob is not a regular expression",
        AllowRule(subscription=SUB, vm_names=("web-.*",)),
        facts(vm_name="web-1"),
        Verdict.NO_MATCH,
        "vm_names",
    ),
    (
        "brackets in a glob are literal (no character classes)",
        AllowRule(subscription=SUB, vm_names=("web-[12]",)),
        facts(vm_name="web-1"),
        Verdict.NO_MATCH,
        "vm_names",
    ),
    (
        "resource groups accept globs and ignore ASCII case",
        AllowRule(subscription=SUB, resource_groups=("WEB*",)),
        facts(resource_group="web-eu"),
        Verdict.MATCH,
        None,
    ),
    (
        "a uniform scale set instance matches its set",
        AllowRule(subscription=SUB, scale_sets=("pool-*",)),
        facts(scale_set="pool-a", vm_name="pool-a_3"),
        Verdict.MATCH,
        None,
    ),
    (
        "a VM in no scale set never matches a scale_sets rule",
        AllowRule(subscription=SUB, scale_sets=("*",)),
        facts(scale_set=""),
        Verdict.NO_MATCH,
        "scale_sets",
    ),
    (
        "the identity's client ID matches",
        AllowRule(subscription=SUB, identities=(CLIENT_ID,)),
        facts(),
        Verdict.MATCH,
        None,
    ),
    (
        "the identity's object ID matches",
        AllowRule(subscription=SUB, identities=(OBJECT_ID,)),
        facts(),
        Verdict.MATCH,
        None,
    ),
    (
        "another identity is refused",
        AllowRule(subscription=SUB, identities=("cccccccc-0000-0000-0000-000000000003",)),
        facts(),
        Verdict.NO_MATCH,
        "identities",
    ),
    (
        "a tag with one of its values matches",
        AllowRule(subscription=SUB, tags=(("env", ("prod", "staging")),)),
        facts(),
        Verdict.MATCH,
        None,
    ),
    (
        "tag names ignore ASCII case",
        AllowRule(subscription=SUB, tags=(("ENV", ("prod",)),)),
        facts(),
        Verdict.MATCH,
        None,
    ),
    (
        "tag values compare exactly",
        AllowRule(subscription=SUB, tags=(("env", ("Prod",)),)),
        facts(),
        Verdict.NO_MATCH,
        "tags",
    ),
    (
        "a missing tag is refused",
        AllowRule(subscription=SUB, tags=(("owner", ("me",)),)),
        facts(),
        Verdict.NO_MATCH,
        "tags",
    ),
    (
        "every tag listed must match (AND)",
        AllowRule(subscription=SUB, tags=(("env", ("prod",)), ("team", ("data",)))),
        facts(),
        Verdict.NO_MATCH,
        "tags",
    ),
    (
        "every field set must match (AND): the first failing one is reported",
        AllowRule(subscription=SUB, locations=("westeurope",), vm_names=("db-*",)),
        facts(),
        Verdict.NO_MATCH,
        "vm_names",
    ),
    (
        "before ARM, a location rule is undecided",
        AllowRule(subscription=SUB, locations=("westeurope",)),
        facts(location=None, tags=None, vm_name=None, scale_set=None),
        Verdict.UNKNOWN,
        "locations",
    ),
    (
        "before ARM, a wrong subscription already refuses",
        AllowRule(subscription=OTHER_SUB, locations=("westeurope",)),
        facts(location=None, tags=None, vm_name=None, scale_set=None),
        Verdict.NO_MATCH,
        "subscription",
    ),
]


@pytest.mark.parametrize(
    ("rule", "vm", "verdict", "field"),
    [c[1:] for c in RULE_CASES],
    ids=[c[0] for c in RULE_CASES],
)
def test_rule_fields(rule: AllowRule, vm: VmFacts, verdict: Verdict, field: str | None) -> None:
    outcome = rule.check(vm)
    assert outcome.verdict is verdict
    assert outcome.field == field


LOOKALIKES = [
    ("Kelvin sign is not k", "\u212aube", "kube"),
    ("long s is not s", "te\u017ft", "test"),
    ("dotless i is not i", "l\u0131nux", "linux"),
    ("sharp s is not ss", "stra\u00dfe", "strasse"),
    ("fullwidth letters are not ASCII", "\uff4b\uff55\uff42\uff45", "kube"),
    ("capital I with dot is not i", "\u0130nfra", "infra"),
]


@pytest.mark.parametrize(
    ("name", "rule_value"), [c[1:] for c in LOOKALIKES], ids=[c[0] for c in LOOKALIKES]
)
def test_unicode_lookalikes_never_match(name: str, rule_value: str) -> None:
    assert not same_azure_name(name, rule_value)
    assert not Glob(rule_value).matches(name)
    rule = AllowRule(subscription=SUB, resource_groups=(rule_value,), vm_names=(rule_value,))
    assert rule.check(facts(resource_group=name)).verdict is Verdict.NO_MATCH
    # ... while ASCII case still folds, as Azure folds it.
    assert Glob(rule_value.upper()).matches(rule_value)


def test_a_pathological_glob_is_fast_by_construction() -> None:
    # Backtracking regex engines take exponential time on this; ours is O(n*m).
    pattern = "*a" * 30 + "b"
    assert not Glob(pattern).matches("a" * 64)


def test_the_first_matching_rule_wins() -> None:
    tok = _token(
        [
            AllowRule(subscription=SUB, locations=("eastus",)),
            AllowRule(subscription=SUB, tags=(("env", ("prod",)),)),
            AllowRule(subscription=SUB),
        ]
    )
    assert match_allow_rules(tok, facts()) is tok.allow[1]


def test_no_rule_matching_is_not_allowed_with_each_rules_first_failing_field() -> None:
    tok = _token(
        [
            AllowRule(subscription=SUB, locations=("eastus",)),
            AllowRule(subscription=OTHER_SUB),
        ]
    )
    with pytest.raises(JoinRejected) as info:
        match_allow_rules(tok, facts())
    assert info.value.code == Code.NOT_ALLOWED
    assert "rule 0: locations 'westeurope'" in info.value.detail
    assert f"rule 1: subscription '{SUB}'" in info.value.detail


def test_the_cheap_refusal_refuses_only_what_no_rule_can_admit() -> None:
    before_arm = facts(location=None, tags=None, vm_name=None, scale_set=None)
    undecided = _token([AllowRule(subscription=SUB, locations=("eastus",))])
    refuse_unless_any_rule_can_match(undecided, before_arm)  # ARM must say where it runs
    hopeless = _token([AllowRule(subscription=OTHER_SUB, locations=("westeurope",))])
    with pytest.raises(JoinRejected) as info:
        refuse_unless_any_rule_can_match(hopeless, before_arm)
    assert info.value.code == Code.NOT_ALLOWED


def _token(rules: list[AllowRule]):  # type: ignore[no-untyped-def]
    from gateway.join.rules import ProvisionToken

    return ProvisionToken(name="t", roles=("Node",), join_method="azure", allow=tuple(rules))


TOKEN_HEAD = """\
kind: token
version: v2
metadata:
  name: {name}
spec:
  roles: [Node]
  join_method: azure
  azure:
    allow:
"""


def _write(tmp_path: Path, rules: str, name: str = "t") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TOKEN_HEAD.format(name=name) + rules)
    return path


def test_every_new_field_parses(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f"""\
    - subscription: {SUB}
      resource_groups: ["web-*"]
      locations: [westeurope, NorthEurope]
      scale_sets: ["pool-?"]
      vm_names: ["web-*", "api-*"]
      identities: ["{CLIENT_ID.upper()}"]
      tags:
        env: [prod, staging]
        team: infra
""",
    )
    (token,) = list(load_token_files([path]))
    (rule,) = token.allow
    assert rule.locations == ("westeurope", "NorthEurope")
    assert [str(g) for g in rule.vm_names] == ["web-*", "api-*"]
    assert rule.identities == (CLIENT_ID,)
    assert rule.tags == (("env", ("prod", "staging")), ("team", ("infra",)))
    assert rule.source.endswith(":10")
    assert (
        rule.check(facts(resource_group="web-eu", scale_set="pool-a", vm_name="web-3")).verdict
        is Verdict.MATCH
    )
    assert "location is one of westeurope, NorthEurope" in rule.describe()


CONFIG_ERRORS = [
    (
        "an unknown rule key",
        f"    - subscription: {SUB}\n      regions: [x]\n",
        "unknown key 'regions'",
    ),
    (
        "an empty vm_names list",
        f"    - subscription: {SUB}\n      vm_names: []\n",
        "must not be empty",
    ),
    (
        "an identity that is not a GUID",
        f"    - subscription: {SUB}\n      identities: [my-identity]\n",
        "must be a GUID",
    ),
    ("tags as a list", f"    - subscription: {SUB}\n      tags: [env]\n", "non-empty mapping"),
    (
        "a tag name twice in different case",
        f"    - subscription: {SUB}\n      tags:\n        env: a\n        ENV: b\n",
        "duplicate tag",
    ),
    (
        "a location that is not a region name",
        f"    - subscription: {SUB}\n      locations: ['west europe']\n",
        "not Azure regions",
    ),
    (
        "a vm_names pattern longer than Azure allows",
        f"    - subscription: {SUB}\n      vm_names: ['{'a' * 65}']\n",
        "longer than Azure allows",
    ),
    (
        "a rule with neither tenant nor subscription",
        "    - vm_names: ['*']\n",
        "must set subscription",
    ),
]


@pytest.mark.parametrize(
    ("rules", "message"), [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS]
)
def test_config_errors_name_file_and_line(tmp_path: Path, rules: str, message: str) -> None:
    path = _write(tmp_path, rules)
    with pytest.raises(ConfigError) as info:
        load_token_files([path])
    assert message in str(info.value)
    assert str(info.value).startswith(f"{path}:")


def test_with_vm_binding_off_a_rule_needing_arm_is_a_config_error(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f"""\
    - subscription: {SUB}
      identities: ["{CLIENT_ID}"]
    - subscription: {SUB}
      tags:
        env: prod
""",
    )
    load_token_files([path], vm_binding=True)
    load_token_files([_write(tmp_path, f"    - subscription: {SUB}\n", "u")], vm_binding=False)
    with pytest.raises(ConfigError) as info:
        load_token_files([path], vm_binding=False)
    assert str(info.value).startswith(f"{path}:12:")
    assert "allow rule 1 uses tags" in str(info.value)
