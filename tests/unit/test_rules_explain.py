"""``join-gateway check-config`` says the rules in words; ``rules explain`` says which rule
admits a VM (as ARM returns it, with the token's claims), or each rule's first failing field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
SUB = "11111111-1111-1111-1111-111111111111"
CLIENT_ID = "aaaaaaaa-0000-0000-0000-000000000001"

TOKENS = f"""\
kind: token
version: v2
metadata:
  name: fleet
spec:
  roles: [Node]
  join_method: azure
  azure:
    allow:
    - subscription: {SUB}
      locations: [eastus]
    - subscription: {SUB}
      vm_names: ["web-*"]
      tags:
        env: [prod, staging]
    labels_from_tags: [env, team]
"""


def _vm(name: str, *, tags: dict[str, str], scale_set: str | None = None) -> dict[str, object]:
    props: dict[str, object] = {"vmId": "5d06deb3-807b-46dd-aef5-78aaf9193f71"}
    if scale_set:
        props["virtualMachineScaleSet"] = {
            "id": f"/subscriptions/{SUB}/resourceGroups/web/providers/"
            f"Microsoft.Compute/virtualMachineScaleSets/{scale_set}"
        }
    return {
        "id": f"/subscriptions/{SUB}/resourceGroups/web/providers/"
        f"Microsoft.Compute/virtualMachines/{name}",
        "name": name,
        "location": "westeurope",
        "tags": tags,
        "properties": props,
    }


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "tokens.yaml").write_text(TOKENS)
    (tmp_path / "claims.json").write_text(json.dumps({"tid": TENANT, "appid": CLIENT_ID}))
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("tokens: {files: [tokens.yaml]}\n")
    return cfg


def _explain(config: Path, vm: dict[str, object]) -> int:
    vm_file = config.parent / "vm.json"
    vm_file.write_text(json.dumps(vm))
    code = main(
        [
            "rules",
            "explain",
            "-c",
            str(config),
            "--token",
            "fleet",
            "--vm-json",
            str(vm_file),
            "--claims-json",
            str(config.parent / "claims.json"),
            "--json",
        ]
    )
    return code


def test_a_matching_vm_names_its_rule(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _explain(config, _vm("web-1", tags={"env": "prod"}))
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["matched_rule"] == 1
    assert report["rules"][0]["first_field_not_matching"] == "locations"
    assert report["rules"][0]["vm_has"] == "westeurope"
    assert report["rules"][1]["outcome"] == "matched"


def test_a_refused_vm_gets_each_rules_first_failing_field(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _explain(config, _vm("web-2", tags={"env": "dev"}, scale_set="pool"))
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert report["matched_rule"] is None
    assert [r["first_field_not_matching"] for r in report["rules"]] == ["locations", "tags"]
    assert report["rules"][1]["vm_has"] == "env=dev"


def test_an_unreadable_vm_file_is_a_usage_error(config: Path) -> None:
    vm_file = config.parent / "vm.json"
    vm_file.write_text("{not json")
    assert (
        main(
            [
                "rules",
                "explain",
                "-c",
                str(config),
                "--token",
                "fleet",
                "--vm-json",
                str(vm_file),
                "--claims-json",
                str(config.parent / "claims.json"),
            ]
        )
        == 2
    )


def test_check_config_says_each_rule_in_words(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["check-config", "-c", str(config)])
    out = capsys.readouterr().out
    assert f"rule 0: admit a VM whose subscription is {SUB}, and whose location is eastus" in out
    assert "labels from tags: env, team" in out
    assert (
        "rule 1:" in out
        and "name is web-*" in out
        and "tags have env = one of prod, staging" in out
    )


NAMED_TOKENS = TOKENS + f"""\
---
kind: token
version: v2
metadata:
  name: named
spec:
  roles: [Node]
  join_method: azure
  azure:
    node_name: "{{vm_name}}.{{resource_group}}.internal"
    host_names: ["{{vm_name}}.prod.internal"]
    host_ips: nic
    allow:
    - subscription: {SUB}
"""


def test_check_config_says_each_tokens_name_policy_in_words(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (config.parent / "tokens.yaml").write_text(NAMED_TOKENS)
    main(["check-config", "-c", str(config)])
    out = capsys.readouterr().out
    assert "  names: node name the VM's Azure name; no other names; no IPs" in out
    assert (
        "  names: node name '{vm_name}.{resource_group}.internal'; "
        "also '{vm_name}.prod.internal'; "
        "IPs: the private IPs of the VM's own network interfaces" in out
    )


def test_explain_says_what_the_name_policy_names_this_vm(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (config.parent / "tokens.yaml").write_text(NAMED_TOKENS)
    vm_file = config.parent / "vm.json"
    vm_file.write_text(json.dumps(_vm("Web-1", tags={})))
    args = ["rules", "explain", "-c", str(config), "--token", "named", "--vm-json", str(vm_file)]
    args += ["--claims-json", str(config.parent / "claims.json")]
    assert main([*args, "--json"]) == 0
    names = json.loads(capsys.readouterr().out)["names"]
    assert names["node_name"] == "web-1.web.internal"
    assert names["host_names"] == ["web-1.prod.internal"]
    assert main(args) == 0
    assert "this VM's node name: web-1.web.internal" in capsys.readouterr().out


IDENTITY_TOKENS = TOKENS + f"""\
---
kind: token
version: v2
metadata:
  name: by-identity
spec:
  roles: [Node]
  join_method: azure
  azure:
    allow:
    - tenant: {TENANT}
      identities: [{CLIENT_ID}]
"""


def _az_vm_show(name: str, *, identity: dict[str, object]) -> dict[str, object]:
    """A VM as ``az vm show -o json`` prints it: ``properties`` lifted to the top level."""
    model = _vm(name, tags={"env": "prod"})
    props = model.pop("properties")
    assert isinstance(props, dict)
    return {**model, **props, "resourceGroup": "web", "identity": identity}


USER_ASSIGNED = {
    "type": "UserAssigned",
    "userAssignedIdentities": {
        f"/subscriptions/{SUB}/resourceGroups/id/providers/Microsoft.ManagedIdentity/"
        "userAssignedIdentities/fleet": {"clientId": CLIENT_ID, "principalId": TENANT[::-1]}
    },
}
EXPLAIN_WITHOUT_CLAIMS = [
    ("a VM with its tenant and the rule's identity attached is admitted",
     {**USER_ASSIGNED, "type": "SystemAssigned, UserAssigned", "tenantId": TENANT,
      "principalId": "bbbbbbbb-0000-0000-0000-000000000002"}, 0),
    ("a VM without the rule's identity is refused",
     {"type": "SystemAssigned", "tenantId": TENANT,
      "principalId": "bbbbbbbb-0000-0000-0000-000000000002"}, 1),
    ("a VM JSON without a tenant needs --claims-json (usage)", USER_ASSIGNED, 2),
]  # fmt: skip


@pytest.mark.parametrize(
    ("identity", "code"),
    [c[1:] for c in EXPLAIN_WITHOUT_CLAIMS],
    ids=[c[0] for c in EXPLAIN_WITHOUT_CLAIMS],
)
def test_explain_reads_az_vm_show_output_without_claims(
    config: Path, capsys: pytest.CaptureFixture[str], identity: dict[str, object], code: int
) -> None:
    (config.parent / "tokens.yaml").write_text(IDENTITY_TOKENS)
    vm_file = config.parent / "vm.json"
    vm_file.write_text(json.dumps(_az_vm_show("web-1", identity=identity)))
    args = ["rules", "explain", "-c", str(config), "--token", "by-identity"]
    assert main([*args, "--vm-json", str(vm_file), "--json"]) == code
    if code == 2:
        assert "pass --claims-json" in capsys.readouterr().err
        return
    report = json.loads(capsys.readouterr().out)
    assert report["matched_rule"] == (0 if code == 0 else None)
    if code == 1:
        assert report["rules"][0]["first_field_not_matching"] == "identities"
