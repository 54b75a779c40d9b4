"""Azure clouds: the table that feeds config validation, the CLI's choices and every check.

Sources: https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service
(attested data signer names per cloud), https://learn.microsoft.com/entra/identity-platform/
access-tokens (v1 issuer ``https://sts.windows.net/<tid>/``; sovereign clouds differ), and
https://learn.microsoft.com/azure/azure-government/compare-azure-government-global-azure.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CLOUDS", "CloudProfile", "cloud_by_name"]


@dataclass(frozen=True)
class CloudProfile:
    name: str
    # The attested document's signer must be this name or a subdomain of it (CN and a SAN).
    metadata_domain: str
    # v1 access tokens (what IMDS hands out) carry iss = issuer_template.format(tid=...)
    issuer_template: str
    # aud of a token IMDS issues for resource=<ARM>
    arm_audience: str
    arm_endpoint: str
    authority_host: str

    def issuer_for(self, tid: str) -> str:
        return self.issuer_template.format(tid=tid)

    def signer_name_ok(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        return name == self.metadata_domain or name.endswith("." + self.metadata_domain)


CLOUDS: dict[str, CloudProfile] = {
    "public": CloudProfile(
        name="public",
        metadata_domain="metadata.azure.com",
        issuer_template="https://sts.windows.net/{tid}/",
        arm_audience="https://management.azure.com/",
        arm_endpoint="https://management.azure.com",
        authority_host="https://login.microsoftonline.com",
    ),
    "usgov": CloudProfile(
        name="usgov",
        metadata_domain="metadata.azure.us",
        issuer_template="https://sts.windows.net/{tid}/",
        arm_audience="https://management.usgovcloudapi.net/",
        arm_endpoint="https://management.usgovcloudapi.net",
        authority_host="https://login.microsoftonline.us",
    ),
    "china": CloudProfile(
        name="china",
        metadata_domain="metadata.azure.cn",
        issuer_template="https://sts.chinacloudapi.cn/{tid}/",
        arm_audience="https://management.chinacloudapi.cn/",
        arm_endpoint="https://management.chinacloudapi.cn",
        authority_host="https://login.chinacloudapi.cn",
    ),
}


def cloud_by_name(name: str) -> CloudProfile:
    try:
        return CLOUDS[name]
    except KeyError:
        raise ValueError(f"unknown cloud {name!r}; choose one of {sorted(CLOUDS)}") from None
