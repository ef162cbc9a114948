"""Every number an alert states, in its message or its evidence, against an independent count.

The count is tshark's dissection of the same capture (tests/tshark_fields.py: one ``-T fields``
pass per file, cached) on every sample, on a selection of the shared corpus that raises the
rules it can, and on captures built with nwcap_testing/synth.py for what neither reaches (a UDP
scan, refused and unanswered SSH and RDP attempts, many names asked of a resolver); the
constructed ones are also checked against the numbers they were built with.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

from analyzer.base.models import Alert, Analysis
from analyzer.judge.analysis import analyze
from analyzer.judge.next_steps import NEXT_STEPS
from analyzer.judge.policy import load_policy
from nwcap_testing import synth
from tests.tshark_fields import (
    Attempts,
    attempts,
    conversations,
    flows,
    frames,
    needs_tshark,
    peer_frames,
    same_time,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
CORPUS = Path("/work/shared/corpus")
VM = "10.0.0.4"
POLICY = load_policy((SAMPLES / "policy.yaml").read_text())
ADMIN_PORTS = (22, 3389, 5985, 5986)
# Captures of the shared corpus whose alerts are checked, and what they exercise (with the
# samples' policy, the VM's addresses inferred).
CORPUS_SELECTION = {
    "ElonFrankie__cyberproject/packetcapture.cap": "external resolver, unexpected endpoints",
    "Buster-Grob__Buster-Grob/packetcapture.cap": "a dozen unexpected endpoints, IPv6",
    "kbandla__dpkt/examples/data/nb6-http.pcap": "external resolver and HTTP endpoints",
    "seladb__PcapPlusPlus/Tests/Pcap++Test/PcapExamples/DnsPackets.pcap": "hundreds of queries",
    "seladb__PcapPlusPlus/Tests/ExamplesTest/pcap_examples/tls.pcap": "TLS endpoints",
    "seladb__PcapPlusPlus/Tests/ExamplesTest/pcap_examples/http-packets2.pcap": "HTTP, 222 frames",
    "seladb__PcapPlusPlus/Tests/Pcap++Test/PcapExamples/raw_ip.pcap": "raw IP, unverified name",
    "the-tcpdump-group__tcpdump/tests/ssh.pcap": "an SSH session from an unlisted source",
    "the-tcpdump-group__tcpdump/tests/kday3.pcap": "SSH attempts, an IPv6 local address",
    "microsoft__prot-od-netcaps/MS-FASOD-captureALL/"
    "MS-FASOD_Example1_Win2019v2004_X64_Win10v2004_X64_Workgroup.pcapng": "pcapng, Windows",
    "microsoft__prot-od-netcaps/[MS-ADOD]-captureALL/"
    "MS-ADOD_Example2_9_Win2016_X64_Win2016_X64_Domain_"
    "ObtainaListOfUserAccountsUsingTheWebServicesProtocols.cap": "Network Monitor format",
}
_IP_LITERAL = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?:/\d+)?\b|\b[0-9a-f]*:[0-9a-f:.]*:[0-9a-f.]*")
_VOLUME = re.compile(r"([\d,]+) bytes out \(sent by the VM\), ([\d,]+) bytes in \(received\)", re.I)


@functools.cache
def analysis_of(path: Path, vm: str | None = None) -> Analysis:
    with path.open("rb") as stream:
        return analyze(stream, local_addresses=[vm] if vm else None, policy=POLICY)


def number(text: str) -> int:
    return int(text.replace(",", ""))


class Checker:
    """The checks of one alert against tshark's view of its capture."""

    def __init__(self, path: Path, analysis: Analysis, alert: Alert) -> None:
        self.path = path
        self.alert = alert
        self.evidence = alert.evidence
        self.local = frozenset(analysis.capture.local_addresses)
        self.frames = peer_frames(path, alert.peer, self.local)
        self.tcp = flows(self.frames, "tcp")
        self.message = alert.message
        # the first IP frame's time, as nwcap read it
        self.accounted = [alert.peer]  # texts of the message already checked or not numbers

    def peer_attempts(self) -> Attempts:
        return attempts(self.tcp, self.alert.peer)

    def vm_attempts(self) -> Attempts:
        found = [attempts(self.tcp, local) for local in self.local]
        return Attempts(
            total=sum(a.total for a in found),
            answered=sum(a.answered for a in found),
            refused=sum(a.refused for a in found),
            unanswered=sum(a.unanswered for a in found),
            by_port={p: n for a in found for p, n in a.by_port.items()},
        )

    def run(self) -> None:
        self.check_common()
        rule = self.alert.rule.replace("-", "_")
        getattr(self, f"check_{rule}", lambda: None)()
        self.check_no_unchecked_numbers()

    def check_common(self) -> None:
        ev, mine = self.evidence, self.frames
        out = [f for f in mine if f.src in self.local]
        back = [f for f in mine if f.dst in self.local]
        assert (ev["packets"], ev["bytes"]) == (len(mine), sum(f.length for f in mine))
        assert (ev["packets_out"], ev["bytes_out"]) == (len(out), sum(f.length for f in out))
        assert (ev["packets_in"], ev["bytes_in"]) == (len(back), sum(f.length for f in back))
        # Network Monitor frames too: their own UTC times, as tshark reads them
        assert same_time(ev["first_seen"], min(f.time for f in mine), 1e-6)
        assert same_time(ev["last_seen"], max(f.time for f in mine), 1e-6)
        looked_up = addresses_looked_up(self.path, self.local)
        assert ev["dns_lookup_seen"] == (self.alert.peer in looked_up)
        step = f" Next step: {NEXT_STEPS[self.alert.rule]}"
        assert self.message.endswith(step) and ev["next_step"] == NEXT_STEPS[self.alert.rule]
        self.message = self.message[: -len(step)]
        self.accounted += [str(n) for n in ev["names"]] + [str(p) for p in ev["ports"]]
        # texts the policy or the capture gave, not counts
        self.accounted += [*ev.get("accounts", ()), *ev.get("expected_accounts", ())]
        self.accounted += [c["name"] for c in ev.get("claimed_names", ())]
        self.accounted += [ev.get("policy_rule") or "", *ev.get("queried_names", ())]
        self.accounted = [text for text in self.accounted if text]
        volume = _VOLUME.search(self.message)
        if volume is not None:
            assert (number(volume[1]), number(volume[2])) == (ev["bytes_out"], ev["bytes_in"])
            self.accounted.append(volume[0])
        if "No DNS lookup for this address was seen" in self.message:
            assert not ev["dns_lookup_seen"]

    def check_inbound_scan(self) -> None:
        ev, truth = self.evidence, self.peer_attempts()
        assert (ev["attempts"], ev["answered"], ev["refused"], ev["unanswered"]) == (
            truth.total,
            truth.answered,
            truth.refused,
            truth.unanswered,
        )
        vm_side_tcp = {
            f.dport if f.dst in self.local else f.sport for f in self.frames if f.protocol == "tcp"
        }
        tcp_ports = set(truth.by_port) if self.vm_attempts().total else vm_side_tcp
        unreachable = [f for f in self.frames if f.src in self.local and f.icmp in ("3:3", "1:4")]
        udp_ports = {f.dport for f in self.frames if f.protocol == "udp" and f.dst in self.local}
        distinct = len(tcp_ports) + (len(udp_ports) if unreachable else 0)
        assert ev["distinct_ports"] == distinct
        assert ev["ports_not_listed"] == distinct - len(ev["ports"])
        scan = re.search(
            r"tried (\d+) distinct local ports \((?:(\d+) TCP connection attempts: (\d+) "
            r"answered, (\d+) refused, (\d+) unanswered)?(?:; )?(?:(\d+) UDP ports answered "
            r"'port unreachable')?\)",
            self.message,
        )
        assert scan is not None, self.message
        assert number(scan[1]) == distinct
        if scan[2] is not None:
            stated = tuple(number(scan[i]) for i in range(2, 6))
            assert stated == (truth.total, truth.answered, truth.refused, truth.unanswered)
        if scan[6] is not None:
            assert number(scan[6]) == len(udp_ports)
        self.accounted.append(scan[0])

    def check_unlisted_admin_source(self) -> None:
        ev, truth = self.evidence, self.peer_attempts()
        ports = [int(p.rsplit("/", 1)[1]) for p in ev["ports"]]
        assert ev["attempts"] == {str(p): truth.by_port.get(p, 0) for p in ports}
        assert (ev["answered"], ev["refused"], ev["unanswered"]) == (
            truth.answered,
            truth.refused,
            truth.unanswered,
        )
        sessions = [
            c
            for c in conversations(self.path, self.local).values()
            if c.protocol == "tcp" and c.peer_address == self.alert.peer and c.local_port in ports
        ]
        established = [c for c in sessions if c.ack_both_ways]
        assert (ev["sessions_seen"], ev["sessions_established"]) == (
            len(sessions),
            len(established),
        )
        longest = max((c.last - c.first for c in established), default=None)
        if longest is None:
            assert ev["longest_established_seconds"] is None
        else:
            assert abs(ev["longest_established_seconds"] - float(longest)) <= 2e-6
        by_ports = {(c.local_port, c.peer_port): c for c in sessions}
        for session in ev["sessions"]:
            c = by_ports[(session["vm_port"], session["peer_port"])]
            assert (
                session["packets_out"],
                session["packets_in"],
                session["bytes_out"],
                session["bytes_in"],
                session["established"],
            ) == (c.packets_out, c.packets_in, c.bytes_out, c.bytes_in, c.ack_both_ways)
            assert same_time(session["first_seen"], c.first)
            assert abs(session["duration_seconds"] - float(c.last - c.first)) <= 2e-6
        state = re.search(
            r"\((?:(\d+) of (\d+) sessions established, the longest ([\d,.]+) s|none of (\d+) "
            r"sessions established|no session seen)\)",
            self.message,
        )
        assert state is not None, self.message
        if state[1] is not None:
            assert (number(state[1]), number(state[2])) == (len(established), len(sessions))
            assert longest is not None and float(state[3].replace(",", "")) == round(
                float(longest), 1
            )
        elif state[4] is not None:
            assert (number(state[4]), len(established)) == (len(sessions), 0)
        else:
            assert not sessions
        self.accounted.append(state[0])
        self.accounted += [f"({p})" for p in ports]

    def check_platform_address_blocked(self) -> None:
        ev, truth = self.evidence, self.vm_attempts()
        assert (ev["attempts"], ev["unanswered"]) == (truth.total, truth.unanswered)
        stated = re.match(r"(\d+) of (\d+) connection attempts from the VM", self.message)
        assert stated is not None
        assert (number(stated[1]), number(stated[2])) == (truth.unanswered, truth.total)
        self.accounted.append(stated[0])

    def check_external_dns_resolver(self) -> None:
        ev = self.evidence
        queried: list[str] = []
        others = 0
        for f in self.frames:
            if f.dst == self.alert.peer and f.dport == 53 and f.dns_query is not None:
                name = f.dns_query.lower()  # DNS names are compared without case
                if name in queried:
                    continue
                if len(queried) < 32:
                    queried.append(name)
                else:
                    others += 1
        assert (ev["queried_names"], ev["queries_for_other_names"]) == (queried, others)
        asked = re.search(r"It was asked for (.+?)(?: and ([\d,]+) more)?\.$", self.message)
        if queried:
            assert asked is not None, self.message
            assert asked[1] == ", ".join(queried[:3])
            more = len(queried) - 3 + others
            assert (number(asked[2]) if asked[2] else 0) == max(more, 0)
            self.accounted.append(asked[0])

    def check_no_unchecked_numbers(self) -> None:
        """Once the checked parts are taken out, no number is left in the message."""
        rest = _IP_LITERAL.sub("", self.message)
        for text in sorted(self.accounted, key=len, reverse=True):
            rest = rest.replace(text, "")
        # port numbers (checked through the ports evidence) and the catalogue's RFC numbers
        rest = re.sub(r"\b(?:tcp|udp)/\d+|TCP port \d+|\(\d+\)|RFC \d+", "", rest)
        assert not re.search(r"\d", rest), (self.alert.rule, rest)


@functools.cache
def addresses_looked_up(path: Path, local: frozenset[str]) -> frozenset[str]:
    """The addresses DNS responses to the VM gave in answer to a query tshark saw."""
    return frozenset(address for f in frames(path) if f.dst in local for address in f.dns_answered)


def check_all(path: Path, analysis: Analysis) -> int:
    checked = 0
    for alert in analysis.alerts:
        if alert.peer == "*":
            continue
        Checker(path, analysis, alert).run()
        checked += 1
    return checked


@needs_tshark
class TestSamples:
    """Every alert of every sample states the numbers tshark counts."""

    @pytest.mark.parametrize("sample", sorted(p.name for p in SAMPLES.glob("*.cap*")))
    def test_every_alert(self, sample: str) -> None:
        analysis = analysis_of(SAMPLES / sample, VM)
        check_all(SAMPLES / sample, analysis)

    def test_inbound_scan_says_one_answered_and_59_refused(self) -> None:
        analysis = analysis_of(SAMPLES / "inbound-scan.cap", VM)
        [alert] = [a for a in analysis.alerts if a.rule == "inbound-scan"]
        assert "60 TCP connection attempts: 1 answered, 59 refused, 0 unanswered" in alert.message


@needs_tshark
@pytest.mark.skipif(not CORPUS.is_dir(), reason="the shared corpus is not on this machine")
class TestCorpus:
    """Every alert on a selection of third-party captures states the numbers tshark counts."""

    @pytest.mark.parametrize("capture", sorted(CORPUS_SELECTION))
    def test_every_alert(self, capture: str) -> None:
        analysis = analysis_of(CORPUS / capture)
        assert check_all(CORPUS / capture, analysis) > 0, "the selection should raise alerts"

    def test_the_selection_reaches_the_rules_it_can(self) -> None:
        rules = {
            alert.rule
            for capture in CORPUS_SELECTION
            for alert in analysis_of(CORPUS / capture).alerts
        }
        assert {
            "external-dns-resolver",
            "unexpected-endpoint",
            "unlisted-admin-source",
            "unverified-name",
        } <= rules


ATTACKER = "198.51.100.66"
RESOLVER = "9.9.9.9"


@pytest.fixture(scope="module")
def constructed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A capture built for what the samples and the corpus do not reach."""
    trace = synth.Trace(
        seed=22,
        start=1_795_600_000,
        local_addresses=[VM],
        local_mac="00:0d:3a:00:00:04",
        gateway_mac="12:34:56:78:9a:bc",
    )
    # a UDP scan: every probe answered "port unreachable" by the VM
    for port in range(7000, 7030):
        probe = synth.udp(ATTACKER, VM, 40000, port, b"probe")
        packet = synth.ip_packet(ATTACKER, VM, synth.PROTO_UDP, probe, ident=trace.next_ident())
        trace.emit(packet)
        trace.wait(100, 300)
        unreachable = synth.icmp_unreachable(3, packet[:28])
        trace.emit(synth.ip_packet(VM, ATTACKER, 1, unreachable, ident=trace.next_ident()))
        trace.wait(100, 300)
    # SSH and RDP from an unlisted source: refused, unanswered, and one session
    trace.syn_refused("203.0.113.77", VM, 3389)
    trace.syn_unanswered("203.0.113.77", VM, 22, retries=1)
    trace.tcp_session("203.0.113.77", VM, 22, [(synth.ssh_banner(), synth.ssh_banner())])
    # forty names asked of an external resolver
    for index in range(40):
        trace.dns_lookup(VM, RESOLVER, f"host{index}.example.net", addresses=["192.0.2.1"])
    path = tmp_path_factory.mktemp("evidence") / "constructed.pcap"
    with path.open("wb") as out:
        synth.write_pcap(out, trace.packets())
    return path


@needs_tshark
class TestConstructed:
    """Built captures: the numbers of the construction, and tshark's, are the alerts'."""

    def test_every_alert_matches_tshark(self, constructed: Path) -> None:
        analysis = analysis_of(constructed, VM)
        assert check_all(constructed, analysis) >= 3

    def test_udp_scan(self, constructed: Path) -> None:
        [alert] = [a for a in analysis_of(constructed, VM).alerts if a.peer == ATTACKER]
        assert alert.rule == "inbound-scan"
        assert alert.evidence["distinct_ports"] == 30
        assert "30 UDP ports answered 'port unreachable'" in alert.message

    def test_admin_attempts_and_session(self, constructed: Path) -> None:
        [alert] = [
            a for a in analysis_of(constructed, VM).alerts if a.rule == "unlisted-admin-source"
        ]
        ev = alert.evidence
        assert ev["attempts"] == {"22": 2, "3389": 1}
        assert (ev["answered"], ev["refused"], ev["unanswered"]) == (1, 1, 1)
        assert (ev["sessions_seen"], ev["sessions_established"]) == (3, 1)
        assert "1 of 3 sessions established" in alert.message

    def test_names_asked_of_a_resolver_are_capped(self, constructed: Path) -> None:
        [alert] = [
            a for a in analysis_of(constructed, VM).alerts if a.rule == "external-dns-resolver"
        ]
        assert alert.evidence["queried_names"] == [f"host{i}.example.net" for i in range(32)]
        assert alert.evidence["queries_for_other_names"] == 8
        assert "host0.example.net, host1.example.net, host2.example.net and 37 more" in (
            alert.message
        )
