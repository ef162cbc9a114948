"""What to do about each rule's alert, in plain words: the alert's message ends with it, its
evidence carries it (``next_step``), and docs/policy.md says the same."""

from __future__ import annotations

from analyzer.judge.policy import (
    DENY_RULE,
    EXTERNAL_DNS_RESOLVER,
    FOREIGN_STORAGE_ACCOUNT,
    IMDS_UNEXPECTED_DIRECTION,
    INBOUND_SCAN,
    NEW_PEER,
    PLATFORM_ADDRESS_BLOCKED,
    UNEXPECTED_ENDPOINT,
    UNLISTED_ADMIN_SOURCE,
    UNVERIFIED_NAME,
)

NEXT_STEPS: dict[str, str] = {
    DENY_RULE: (
        "find the process on the VM that talks to this address (ss -tnp on Linux, "
        "Get-NetTCPConnection on Windows) and stop it, or change the deny rule if the traffic "
        "is legitimate."
    ),
    FOREIGN_STORAGE_ACCOUNT: (
        "if the account is not yours, find the process that uploads to it (bytes out) and "
        "rotate the secrets it could reach; if it is, add it to expected_storage_accounts."
    ),
    UNLISTED_ADMIN_SOURCE: (
        "if a session was established, check the VM's sign-ins from this address "
        "(/var/log/auth.log, or Windows Security event 4624); then limit the NSG rule for the "
        "port to your admin addresses (or use Azure Bastion or just-in-time access), or add "
        "the source to admin_sources."
    ),
    EXTERNAL_DNS_RESOLVER: (
        "find what sends queries there (/etc/resolv.conf, systemd-resolved or the NIC's DNS "
        "servers; the names queried hint at the software) and point it at Azure DNS, or add "
        "the resolver to dns_resolvers."
    ),
    IMDS_UNEXPECTED_DIRECTION: (
        "find the process behind this traffic (open the capture with the display filter) and "
        "whether anything on the VM answers for 169.254.169.254; allow it by policy only once "
        "it is understood."
    ),
    INBOUND_SCAN: (
        "check that the ports that answered are meant to be reachable from this source, and "
        "deny the rest in the NSG (or restrict it to known sources)."
    ),
    PLATFORM_ADDRESS_BLOCKED: (
        "check the NSG, the VM's own firewall (iptables/nftables, Windows Firewall) and any "
        "proxy for rules that block 168.63.129.16 or 169.254.169.254: the VM agent, DHCP, DNS "
        "and health probes need them."
    ),
    UNEXPECTED_ENDPOINT: (
        "identify the process (ss -tnp on Linux, netstat -b on Windows) and who owns the "
        "address; then allow it by an allow rule, or block it in the NSG."
    ),
    UNVERIFIED_NAME: (
        "resolve the claimed name yourself with a resolver you trust and compare the answer "
        "with this address; if they differ treat the peer as unexpected, else turn on live "
        "DNS checks (--live-dns) or allow the address by CIDR."
    ),
    NEW_PEER: (
        "if the peer is expected, nothing: it is now part of the VM's baseline; if not, see "
        "the other alerts about it."
    ),
}
