"""The catalogue an allow-list policy leaves: the Azure platform, and the VM's own storage.

Under ``mode: allow-list`` only what the policy names is expected ("everything not allowed is
unexpected"), except what no Azure VM can run without: the platform address 168.63.129.16
(Azure DNS, DHCP, the VM agent, HostGAPlugin, load-balancer probes), the Instance Metadata
Service 169.254.169.254 and the IPv6 gateway, each known by its address. The storage endpoint
entry stays when the policy lists ``expected_storage_accounts``: an endpoint then counts as the
VM's own storage only when a verified name identifies one of those accounts (another account,
or an unidentified one, raises ``foreign-storage-account`` as in the catalogue mode). Everything
else the catalogue knows (Windows activation, update mirrors, monitoring, Entra ID, the trusted
service tags) needs an allow rule.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from analyzer.judge.catalog import Catalog
from analyzer.judge.policy import Policy

PLATFORM_ENTRIES = frozenset({"wireserver", "imds", "ipv6-gateway"})
STORAGE_ENTRY = "storage"


def catalogue_for(policy: Policy, catalog: Catalog | None) -> Catalog:
    """The catalogue classification uses under ``policy``: ``catalog`` (default: the shipped
    one) in the catalogue mode; in the allow-list mode, the shipped catalogue's platform
    entries only (and its storage entry when the policy lists storage accounts)."""
    if not policy.allow_list:
        return catalog or Catalog.load_default()
    return _platform_catalogue(bool(policy.expected_storage_accounts))


@lru_cache(maxsize=2)
def _platform_catalogue(with_storage: bool) -> Catalog:
    data: dict[str, Any] = json.loads(
        (Path(__file__).parent / "data" / "azure_catalog.json").read_text("utf-8")
    )
    data["addresses"] = [e for e in data["addresses"] if e["id"] in PLATFORM_ENTRIES]
    data["names"] = [e for e in data["names"] if with_storage and e["id"] == STORAGE_ENTRY]
    tags = dict(data["service_tags"])
    tags["expected"] = []
    if not with_storage:
        tags["storage"] = []
    data["service_tags"] = tags
    return Catalog(data)
