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
