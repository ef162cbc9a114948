"""``nwcap policy validate`` and ``nwcap policy explain``: check a policy file before it is
deployed, and ask what it (and the Azure catalogue) would say of one address for one VM.

``explain`` classifies one made-up peer exactly as processing would (the same
:func:`analyzer.judge.classify.classify`, under the policy of that VM's scopes), so that what it
says is what a capture would show. docs/policy.md describes both commands.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

from analyzer.base.models import CaptureInfo, Peer, PeerName, PortCount, Summary
from analyzer.cli.common import command
from analyzer.cli.exits import EXIT_DATAERR, InputError, UsageError
from analyzer.cli.output import emit, output_options
from analyzer.judge.policy import Policy, load_policy
from analyzer.judge.policy_scope import Machine

AZURE_DNS = "168.63.129.16"


def add_commands(sub: Any) -> None:
    """Register ``nwcap policy validate|explain``."""
    policy = command(
        sub,
        "policy",
        help="validate a policy file, or explain what decides about an address for a VM",
        examples=[
            ("nwcap policy validate policy.yaml", "check a file before uploading it"),
            (
                "nwcap policy explain --policy policy.yaml --vm vm-web-01 --resource-group "
                "rg-web 203.0.113.7",
                "what decides about an address for one VM",
            ),
        ],
    )
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    validate = command(
        actions,
        "validate",
        help="check policy files as processing loads them; errors name file, line and column",
        examples=[("nwcap policy validate policy.yaml staging.yaml", "exit 0, or 65 with errors")],
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="policy file (YAML or JSON)")
    validate.set_defaults(func=run_validate)
    explain = command(
        actions,
        "explain",
        help="which rule or catalogue entry decides about IP for a VM, and why",
        examples=[
            (
                "nwcap policy explain --policy policy.yaml --vm vm-web-01 203.0.113.7",
                "the VM connecting to 203.0.113.7 on TCP 443",
            ),
            (
                "nwcap policy explain --vm vm-web-01 --name archive.ubuntu.com --port 80 "
                "91.189.91.83",
                "with a name the VM resolved, on port 80",
            ),
            (
                "nwcap policy explain --vm web-vmss_3 --scale-set web-vmss --direction in "
                "--port 22 -o json 198.51.100.7",
                "SSH into a scale-set instance, as JSON",
            ),
        ],
    )
    explain.add_argument("ip", help="the peer's address")
    explain.add_argument("--vm", required=True, help="the VM's name (scale-set instance: SET_N)")
    explain.add_argument("--resource-group", default="", help="the VM's resource group")
    explain.add_argument("--subscription", default="", help="the VM's subscription id")
    explain.add_argument("--scale-set", default="", help="the VM's scale set, if any")
    explain.add_argument(
        "--policy", metavar="FILE", help="policy file (default: NWCAP_POLICY, a local file)"
    )
    explain.add_argument(
        "--service-tags",
        metavar="FILE",
        help="a ServiceTags_Public_*.json file, for rules and names that need service tags",
    )
    explain.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="FQDN",
        help="a name the VM resolved for the peer through Azure DNS (repeatable; verified)",
    )
    explain.add_argument("--port", type=int, default=443, help="the server's port (443)")
    explain.add_argument("--protocol", choices=("tcp", "udp"), default="tcp")
    explain.add_argument(
        "--direction",
        choices=("out", "in"),
        default="out",
        help="out: the VM connects to the peer (default); in: the peer connects to the VM",
    )
    output_options(explain)
    explain.set_defaults(func=run_explain)


def _read(name: str) -> str:
    try:
        return Path(name).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read policy file {name}: {error}") from None


def run_validate(args: argparse.Namespace) -> int:
    """Each file: ``FILE: valid ...`` on stdout, or its error (file:line:column) on stderr."""
    from analyzer.base.errors import PolicyError  # noqa: PLC0415

    failed = False
    for name in args.files:
        try:
            policy = load_policy(_read(name), source=name)
        except PolicyError as error:
            print(f"nwcap: error: {error}", file=sys.stderr)
            failed = True
            continue
        scopes = ", ".join(s.name for s in policy.scopes) or "none"
        print(f"{name}: valid (version {policy.version}, mode {policy.mode}, scopes: {scopes})")
    return EXIT_DATAERR if failed else 0


def run_explain(args: argparse.Namespace) -> int:
    from analyzer.judge.classify import classify  # noqa: PLC0415 - loads the catalogue

    location = args.policy or os.environ.get("NWCAP_POLICY", "").strip()
    if location and not Path(location).is_file():
        raise UsageError(f"{location!r} is not a local file: pass --policy FILE")
    base = load_policy(_read(location), source=location) if location else Policy.default()
    try:
        address = str(ipaddress.ip_address(args.ip))
    except ValueError:
        raise UsageError(f"{args.ip!r} is not an IP address") from None
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port 1-65535")
    machine = Machine(args.subscription, args.resource_group, args.vm, args.scale_set)
    policy = base.for_machine(machine)
    tags = None
    if args.service_tags:
        from analyzer.judge.servicetags import ServiceTags  # noqa: PLC0415

        try:
            tags = ServiceTags.from_json(Path(args.service_tags).read_bytes())
        except OSError as error:
            raise InputError(f"cannot read service tags {args.service_tags}: {error}") from None
    peers, alerts = classify(_summary(address, args), policy=policy, service_tags=tags)
    [peer] = peers
    document = {
        "vm": machine.vm,
        "address": address,
        "traffic": f"{args.direction} {args.protocol}/{args.port}",
        "policy": location or None,
        "policy_version": policy.version,
        "mode": policy.mode,
        "scopes": list(policy.applied_scopes),
        "category": peer.category,
        "expected": peer.expected,
        "why": peer.reason,
        "decided_by": _deciders(policy, address, peer.names),
        "alerts": [{"rule": a.rule, "severity": a.severity, "message": a.message} for a in alerts],
    }
    if args.output == "table" and args.query is None:
        _print_explanation(document)
    else:
        emit(args, document)
    return 0


def _summary(address: str, args: argparse.Namespace) -> Summary:
    """One peer with the traffic asked about, by the lowest-port rule (no handshake seen)."""
    local_address = "fd00::4" if ":" in address else "10.0.0.4"
    ephemeral = PortCount(args.protocol, 50000, 10, 1000)
    served = PortCount(args.protocol, args.port, 10, 1000)
    names = tuple(
        PeerName(name.lower(), "dns", (name.lower(),), resolver=AZURE_DNS) for name in args.name
    )
    remote, local = (served, ephemeral) if args.direction == "out" else (ephemeral, served)
    peer = Peer(
        address=address,
        local_addresses=(local_address,),
        packets_sent=10,
        packets_received=10,
        bytes_sent=1000,
        bytes_received=1000,
        first_seen=0.0,
        last_seen=1.0,
        protocols={args.protocol: 20},
        remote_ports=(remote,),
        local_ports=(local,),
        names=names,
        exchanged=True,
    )
    capture = CaptureInfo(
        format="pcap",
        link_types=(1,),
        packets=20,
        bytes=2000,
        first_seen=0.0,
        last_seen=1.0,
        local_addresses=(local_address,),
        local_addresses_inferred=False,
        complete=True,
    )
    return Summary(capture=capture, conversations=(), peers=(peer,))


def _deciders(policy: Policy, address: str, names: tuple[PeerName, ...]) -> list[str]:
    """What in the policy and the catalogue names this address or its (verified) names, in the
    order they are weighed."""
    from fnmatch import fnmatchcase  # noqa: PLC0415

    from analyzer.judge.allowlist import catalogue_for  # noqa: PLC0415

    ip = ipaddress.ip_address(address)
    found = []
    catalogue = catalogue_for(policy, None)
    entry = catalogue.match_address(ip)
    if entry is not None:
        found.append(f"catalogue entry '{entry.id}' ({entry.label}) by address")
    elif (by_name := catalogue.match_names(names)) is not None:
        found.append(
            f"catalogue entry '{by_name.entry.id}' ({by_name.entry.label}) by name {by_name.name}"
        )
    plain = [name.name for name in names]
    for kind, rules in (("deny", policy.deny), ("allow", policy.allow)):
        found.extend(
            f"{kind} rule '{rule.name}' ({rule.describe()})"
            for rule in rules
            if (rule.cidr is None or (ip.version == rule.cidr.version and ip in rule.cidr))
            and (rule.fqdn is None or any(fnmatchcase(n, rule.fqdn) for n in plain))
            and (rule.cidr is not None or rule.fqdn is not None)
        )
    for field_name in ("vnet_ranges", "admin_sources", "dns_resolvers"):
        found.extend(
            f"{field_name} {network}"
            for network in getattr(policy, field_name)
            if ip.version == network.version and ip in network
        )
    if policy.allow_list:
        found.append("mode allow-list: only the policy and the Azure platform expect peers")
    return found


def _print_explanation(document: dict[str, Any]) -> None:
    from analyzer.present.textsafe import terminal_text  # noqa: PLC0415

    verdict = "expected" if document["expected"] else "NOT expected"
    lines = [
        f"{document['address']} for VM {document['vm']} ({document['traffic']}): {verdict}",
        f"category:  {document['category']}",
        f"why:       {document['why']}",
        f"policy:    {document['policy'] or 'none'} (version {document['policy_version']}, "
        f"mode {document['mode']})",
        f"scopes:    {', '.join(document['scopes']) or 'none apply'}",
    ]
    lines.extend(f"decided:   {item}" for item in document["decided_by"])
    lines.extend(
        f"alert:     {a['rule']} ({a['severity']}): {a['message']}" for a in document["alerts"]
    )
    print("\n".join(terminal_text(line) for line in lines))
