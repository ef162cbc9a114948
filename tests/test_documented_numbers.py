"""Every number the documentation promises, pinned twice: in the docs and in the code.

Each row names a document, the words it uses, the code's value and the value as a literal
written here. The test fails when the code's value changes (``max_seconds`` 480 → 4800 once
passed every test, because defaults were only compared with themselves), and when the
document no longer says it, so that a change of either side is a change of both. Settings'
defaults are read from the tables of docs/settings.md and SECURITY.md, and the documented
text is also fed back through the setting, which pins its unit.

Caps are crossed too: a fragment flood one past ``MAX_FRAGMENTS``, an HTTP head one byte past
8 KiB, a blob whose runs die once more than ``MAX_ATTEMPTS`` allows.
"""

from __future__ import annotations

import inspect
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import ContainerClient

from analyzer.base.models import ACTIVITY_BUCKETS, SECOND_TEXTS_KEPT, SEVERITY_ORDER
from analyzer.capture import dnswire, flows, folded, local_addresses, names, pcapng, readerbase
from analyzer.capture.budget import Budget, InvalidSettingError
from analyzer.capture.engine import summarize
from analyzer.judge import policy
from analyzer.pipeline import alert_delivery, processing, reconcile_report, servicetags_refresh
from analyzer.pipeline.processing import process_blob
from analyzer.pipeline.reconcile_settings import checked_schedule
from analyzer.pipeline.reference_files import ReferenceFile
from analyzer.pipeline.run import AppSettings
from analyzer.store import blobstream, tablekeys
from analyzer.store.results import TableResultsStore
from analyzer.web.api import BadRequest, parse_limit
from nwcap_testing import synth
from tests.conftest import network_watcher_path, udp_capture
from tests.dying_runs import DyingStore, Killed

ROOT = Path(__file__).resolve().parents[1]
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
MINUTE, HOUR, DAY = 60, 3600, 86400


@cache
def doc(name: str) -> str:
    """A document with its white space folded, so that a phrase may cross line breaks."""
    return " ".join((ROOT / name).read_text(encoding="utf-8").split())


@cache
def setting_defaults(name: str, column: int) -> dict[str, str]:
    """Setting → documented default, from the rows of a document's tables that name settings
    in backticks in their first cell (``column``: the default's cell). A row naming several
    settings lists their defaults separated by ", "."""
    defaults: dict[str, str] = {}
    for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) <= column:
            continue
        settings = re.findall(r"`([A-Za-z][A-Za-z0-9_]*)`", cells[0])
        text = cells[column].replace("`", "")
        values = text.split(", ") if len(settings) > 1 else [text]
        if len(values) == len(settings):
            defaults.update(zip(settings, values, strict=True))
    return defaults


def host_json() -> dict[str, Any]:
    return dict(json.loads((ROOT / "host.json").read_text(encoding="utf-8")))


@dataclass(frozen=True)
class Default:
    """A setting's documented default: the text, its value here, the code's value (read from
    settings parsed from an empty environment) and the setting's own spelling of the value
    (the text, unless it is not what the setting takes)."""

    setting: str
    text: str
    value: object
    code: Callable[[AppSettings], object]
    spelled: str | None = None


DEFAULTS = [
    Default(
        "NWCAP_MAX_DECOMPRESSED_BYTES",
        "8 GiB",
        8 * GIB,
        lambda s: s.processing.budget.max_decompressed_bytes,
        str(8 * GIB),
    ),
    Default(
        "NWCAP_MAX_PACKETS",
        "50,000,000",
        50_000_000,
        lambda s: s.processing.budget.max_packets,
        "50000000",
    ),
    Default("NWCAP_MAX_SECONDS", "480", 480, lambda s: s.processing.budget.max_seconds),
    Default("NWCAP_MAX_PEERS", "20,000", 20_000, lambda s: s.processing.budget.max_peers, "20000"),
    Default(
        "NWCAP_MAX_ALERTS_PER_RULE", "50", 50, lambda s: s.processing.budget.max_alerts_per_rule
    ),
    Default("NWCAP_LIVE_DNS", "system", "system", lambda s: s.processing.live_dns.mode),
    Default("NWCAP_LIVE_DNS_TIMEOUT", "2", 2, lambda s: s.processing.live_dns.timeout),
    Default("NWCAP_LIVE_DNS_MAX_LOOKUPS", "32", 32, lambda s: s.processing.live_dns.max_lookups),
    Default("NWCAP_LIVE_DNS_MAX_SECONDS", "10", 10, lambda s: s.processing.live_dns.max_seconds),
    Default("NWCAP_BASELINE_MAX_AGE_DAYS", "90", 90 * DAY, lambda s: s.processing.baseline_max_age),
    Default("RECONCILE_LOOKBACK", "48h", 48 * HOUR, lambda s: s.reconcile.lookback),
    Default("RECONCILE_STALE_AFTER", "70m", 70 * MINUTE, lambda s: s.reconcile.stale_after),
    Default("RECONCILE_LIMIT", "20", 20, lambda s: s.reconcile.limit),
    Default("RECONCILE_MAX_DURATION", "40m", 40 * MINUTE, lambda s: s.reconcile.max_seconds),
    Default("RECONCILE_POISON", "32", 32, lambda s: s.reconcile.poison_limit),
    Default("RECONCILE_GRACE", "5m", 5 * MINUTE, lambda s: s.reconcile.grace),
    Default(
        "NWCAP_SERVICE_TAGS_REFRESH_INTERVAL",
        "24h",
        24 * HOUR,
        lambda s: s.tags_refresh.interval_seconds,
    ),
    Default(
        "NWCAP_SERVICE_TAGS_REFRESH_CONTAINER",
        "nwcap-config",
        "nwcap-config",
        lambda s: s.tags_refresh.container,
    ),
    Default(
        "NWCAP_SERVICE_TAGS_REFRESH_BLOB",
        "servicetags.json",
        "servicetags.json",
        lambda s: s.tags_refresh.blob,
    ),
    Default(
        "NWCAP_SERVICE_TAGS_ENDPOINT",
        "https://management.azure.com",
        "https://management.azure.com",
        lambda s: s.tags_refresh.endpoint,
    ),
    Default(
        "NWCAP_SERVICE_TAGS_API_VERSION",
        "2025-05-01",
        "2025-05-01",
        lambda s: s.tags_refresh.api_version,
    ),
]

# The budget table of SECURITY.md states the same five defaults.
SECURITY_BUDGET = {d.setting: d for d in DEFAULTS if d.setting.startswith("NWCAP_MAX_")}


class TestSettingDefaults:
    """Each default in docs/settings.md is the literal here and what the code uses."""

    @pytest.mark.parametrize("default", DEFAULTS, ids=lambda d: d.setting)
    def test_documented_default(self, default: Default) -> None:
        assert setting_defaults("docs/settings.md", 2).get(default.setting) == default.text
        assert default.code(AppSettings.from_environ({})) == default.value

    @pytest.mark.parametrize("default", DEFAULTS, ids=lambda d: d.setting)
    def test_documented_text_read_back_is_the_default(self, default: Default) -> None:
        spelled = default.text if default.spelled is None else default.spelled
        settings = AppSettings.from_environ({default.setting: spelled})
        assert default.code(settings) == default.value

    @pytest.mark.parametrize("setting", sorted(SECURITY_BUDGET))
    def test_security_budget_table(self, setting: str) -> None:
        assert setting_defaults("SECURITY.md", 1).get(setting) == SECURITY_BUDGET[setting].text

    def test_budget_defaults_when_built_without_settings(self) -> None:
        assert Budget() == Budget(8 * GIB, 50_000_000, 480.0, 20_000, 50)

    def test_reconcile_schedule(self) -> None:
        documented = setting_defaults("docs/settings.md", 2)["RECONCILE_SCHEDULE"]
        assert documented == checked_schedule("") == "0 */10 * * * *"
        assert "every 10 minutes" not in documented  # the cell is the expression itself

    def test_refresh_interval_bounds(self) -> None:
        assert "how often the timer asks (1m to 400d)" in doc("docs/settings.md")
        setting = "NWCAP_SERVICE_TAGS_REFRESH_INTERVAL"
        for inside, seconds in (("1m", MINUTE), ("400d", 400 * DAY)):
            refresh = AppSettings.from_environ({setting: inside}).tags_refresh
            assert refresh.interval_seconds == seconds
        for outside in ("59s", "401d"):
            with pytest.raises(InvalidSettingError, match=setting):
                AppSettings.from_environ({setting: outside})

    def test_alert_settings(self) -> None:
        documented = setting_defaults("docs/alerts.md", 1)
        assert documented["ALERTS_QUEUE"] == alert_delivery.DEFAULT_QUEUE == "nwcap-alerts"
        assert documented["ALERTS_MIN_SEVERITY"] == alert_delivery.DEFAULT_MIN_SEVERITY == "low"


# The compiled walk's slots, as _walk.c defines them
WALK_CACHE_SLOTS = int(
    re.search(
        r"#define CACHE_SLOTS (\d+)",
        (Path(__file__).parents[1] / "analyzer/capture/_walk.c").read_text(encoding="utf-8"),
    ).group(1)  # type: ignore[union-attr]
)


@dataclass(frozen=True)
class Promise:
    """A number stated in the prose of a document: the words, the code's value, the literal."""

    doc: str
    words: str
    code: object
    value: object


PROMISES = [
    # SECURITY.md, fixed bounds in the code
    Promise(
        "SECURITY.md", "HTTP request heads are parsed up to 8 KiB", names.MAX_HTTP_HEAD, 8 * KIB
    ),
    Promise("SECURITY.md", "a ClientHello up to 64 KiB", names.MAX_PARTIAL_BYTES, 64 * KIB),
    Promise(
        "SECURITY.md",
        "at most 1,024 partial TLS/HTTP heads and as many DNS-over-TCP buffers",
        names.MAX_PARTIAL_FLOWS,
        1024,
    ),
    Promise(
        "SECURITY.md",
        "more than 16 questions make a message malformed",
        dnswire.MAX_DNS_QUESTIONS,
        16,
    ),
    Promise("SECURITY.md", "at most 256 answers are read", dnswire.MAX_DNS_ANSWERS, 256),
    Promise("SECURITY.md", "at most 32 hops", dnswire.MAX_CNAME_HOPS, 32),
    Promise("SECURITY.md", "at most 512 messages of at most 512 bytes", names.MAX_PARSED_DNS, 512),
    Promise(
        "SECURITY.md",
        "at most 512 messages of at most 512 bytes",
        names.PARSED_DNS_MAX_BYTES,
        512,
    ),
    Promise("SECURITY.md", "at most 1,024 flows' counts in C", WALK_CACHE_SLOTS, 1024),
    Promise("SECURITY.md", "the text of at most 4,096 seconds", SECOND_TEXTS_KEPT, 4096),
    Promise(
        "SECURITY.md",
        "At most 100,000 named addresses with 16 names each",
        names.MAX_ADDRESSES,
        100_000,
    ),
    Promise(
        "SECURITY.md",
        "At most 100,000 named addresses with 16 names each",
        names.MAX_NAMES_PER_ADDRESS,
        16,
    ),
    Promise("SECURITY.md", "250,000 open flows", flows.MAX_FLOWS, 250_000),
    Promise("SECURITY.md", "10,000 pending IP fragments", flows.MAX_FRAGMENTS, 10_000),
    Promise("SECURITY.md", "at most 65,536 interfaces per section", pcapng.MAX_INTERFACES, 65_536),
    Promise(
        "SECURITY.md", "link types kept in a set, 64 listed", readerbase.MAX_LISTED_LINK_TYPES, 64
    ),
    Promise(
        "SECURITY.md",
        "Local-address inference is one pass over the address pairs; at most 256 addresses",
        local_addresses.MAX_LOCAL_ADDRESSES,
        256,
    ),
    Promise("SECURITY.md", "a 60-bucket activity histogram", ACTIVITY_BUCKETS, 60),
    Promise("SECURITY.md", "/24 for IPv4, /48 for IPv6", folded.FOLD_PREFIXES[4][0], 24),
    Promise("SECURITY.md", "/24 for IPv4, /48 for IPv6", folded.FOLD_PREFIXES[16][0], 48),
    Promise("SECURITY.md", "more than 1,024 groups", folded.MAX_FOLDED_GROUPS, 1024),
    Promise("SECURITY.md", "exact up to 64 per group", folded.EXACT_DISTINCT, 64),
    Promise("SECURITY.md", "CIDRs of at most 256 addresses", policy.SMALL_NETWORK, 256),
    # docs/settings.md, prose
    Promise(
        "docs/settings.md",
        "checked again at most every 5 minutes",
        inspect.signature(ReferenceFile).parameters["refresh_seconds"].default,
        5 * MINUTE,
    ),
    Promise(
        "docs/settings.md",
        "a timeout after 2 minutes",
        servicetags_refresh.DEFAULT_TIMEOUT,
        2 * MINUTE,
    ),
    Promise(
        "docs/settings.md",
        "after a failed call it asks again within an hour",
        servicetags_refresh.DEFAULT_RETRY_AFTER_FAILURE,
        HOUR,
    ),
    # docs/data-model.md
    Promise(
        "docs/data-model.md",
        "Free text in a key is cut to 120 characters",
        tablekeys.MAX_KEY_TEXT,
        120,
    ),
    Promise(
        "docs/data-model.md",
        "after 20 the capture is recorded `failed` (`GaveUpError`)",
        processing.MAX_ATTEMPTS,
        20,
    ),
    Promise(
        "docs/data-model.md",
        "transactions of at most 100 entities of one partition",
        tablekeys.MAX_BATCH_ENTITIES,
        100,
    ),
    Promise(
        "docs/data-model.md",
        "deletes rows of runs started more than 30 days before it",
        reconcile_report.RUN_RETENTION,
        30 * DAY,
    ),
    Promise(
        "docs/data-model.md",
        "A string property holds at most 64 KiB",
        tablekeys.MAX_PROPERTY_BYTES,
        64 * KIB,
    ),
    Promise("docs/data-model.md", "and an entity 1 MiB", tablekeys.MAX_ENTITY_BYTES, MIB),
    Promise("docs/data-model.md", "`limit` is 1 to 1000 (default 100)", tablekeys.MAX_PAGE, 1000),
    Promise(
        "docs/data-model.md",
        "(rank: info 0, low 1, medium 2, high 3,",
        SEVERITY_ORDER,
        {"info": 0, "low": 1, "medium": 2, "high": 3},
    ),
    # docs/data-model.md, the partitions (issues #20, #21)
    Promise(
        "docs/data-model.md",
        "its peers in key order, 100 a partition",
        tablekeys.PEERS_PER_PARTITION,
        100,
    ),
    Promise(
        "docs/data-model.md",
        "`day-{yyyy-mm-dd}\\|{nn}` (16 shards)",
        tablekeys.DAY_SHARDS,
        16,
    ),
    Promise(
        "docs/data-model.md",
        "(16 address buckets \u00d7 16 capture shards)",
        (tablekeys.INDEX_ADDRESS_BUCKETS, tablekeys.INDEX_CAPTURE_SHARDS),
        (16, 16),
    ),
    Promise(
        "docs/data-model.md",
        "as many as its first capture needed at ~100 peers each (a power of two, 1 to 256)",
        (tablekeys.BASELINE_ROWS_PER_SHARD, tablekeys.MAX_BASELINE_SHARDS),
        (100, 256),
    ),
    # docs/alerts.md
    Promise(
        "docs/alerts.md",
        "the queue refuses one message (400/413) `MAX_ATTEMPTS` (10) times",
        alert_delivery.MAX_ATTEMPTS,
        10,
    ),
]


class TestDocumentedNumbers:
    """Each number stated in prose is in its document, and the code has it."""

    @pytest.mark.parametrize("promise", PROMISES, ids=lambda p: f"{p.doc}: {p.words[:40]}")
    def test_promise(self, promise: Promise) -> None:
        assert promise.words in doc(promise.doc)
        assert promise.code == promise.value

    def test_page_sizes(self) -> None:
        assert "`limit` is 1 to 1000 (default 100)" in doc("docs/data-model.md")
        assert parse_limit(None) == 100
        assert parse_limit("1") == 1 and parse_limit("1000") == 1000
        for outside in ("0", "1001"):
            with pytest.raises(BadRequest):
                parse_limit(outside)

    def test_key_shapes(self) -> None:
        text = doc("docs/data-model.md")
        assert "eight digits (`00000001`)" in text
        assert tablekeys.generation_prefix(1) == "00000001|"
        assert "`{VM key}.{20 hex digits}`" in text
        assert re.fullmatch(r"vm-web-01\.[0-9a-f]{20}", capture_id_of("vm-web-01"))
        cut = tablekeys.bounded_key("x" * 500)
        assert len(cut) == 120 and cut.startswith("x" * 99 + ".")

    def test_read_ahead_memory(self) -> None:
        # docs/settings.md (host.json): memory per run is the download's read-ahead
        assert "read-ahead of 4 chunks of 2 MiB" in doc("docs/settings.md")
        assert (blobstream.DEFAULT_CONCURRENCY, processing.DOWNLOAD_CHUNK) == (4, 2 * MIB)


def capture_id_of(vm: str) -> str:
    from analyzer.store.blobpath import parse_capture_path

    return tablekeys.capture_id_for(parse_capture_path("captures", network_watcher_path(vm)))


class TestHostJson:
    """host.json holds what docs/settings.md says it does."""

    def test_choices(self) -> None:
        host = host_json()
        text = doc("docs/settings.md")
        assert host["functionTimeout"] == "01:00:00"
        assert "`functionTimeout` `01:00:00`" in text
        assert host["extensions"]["blobs"]["maxDegreeOfParallelism"] == 2
        assert "`extensions.blobs.maxDegreeOfParallelism` `2`" in text
        assert host["extensions"]["blobs"]["poisonBlobThreshold"] == 5
        assert "`extensions.blobs.poisonBlobThreshold` `5`" in text
        assert "ends in the poison queue after five tries" in text


# --- caps crossed ---------------------------------------------------------------------------

VM, PEER, FILLER = "10.0.0.4", "20.0.0.1", "20.0.0.2"
VM_MAC, GW_MAC = "00:0d:3a:6f:12:04", "12:34:56:78:9a:bc"


def fragment_flood(first_fragments: int) -> bytes:
    """A capture where the VM sends PEER a UDP datagram (port 9000) in two fragments, with
    ``first_fragments - 1`` first fragments of other datagrams (to FILLER) in between: the
    trailing fragment finds its ports only if its first fragment is still pending."""

    def frame(dst: str, ident: int, *, first: bool) -> bytes:
        if first:
            payload = synth.udp(VM, dst, 40000, 9000, bytes(16))[:16]
            packet = synth.ipv4(
                VM,
                dst,
                synth.PROTO_UDP,
                payload,
                ident=ident,
                dont_fragment=False,
                more_fragments=True,
            )
        else:
            packet = synth.ipv4(
                VM,
                dst,
                synth.PROTO_UDP,
                bytes(8),
                ident=ident,
                dont_fragment=False,
                fragment_offset=16,
            )
        return synth.ethernet(GW_MAC, VM_MAC, synth.ETHERTYPE_IPV4, packet)

    frames = [frame(PEER, 0, first=True)]
    frames += [frame(FILLER, ident, first=True) for ident in range(1, first_fragments)]
    frames.append(frame(PEER, 0, first=False))
    start = 1_795_600_000 * synth.NS_PER_SECOND
    buffer = io.BytesIO()
    synth.write_pcap(
        buffer, (synth.Packet(start + i * 1000, data) for i, data in enumerate(frames))
    )
    return buffer.getvalue()


def udp_ports_of_peer(capture: bytes) -> set[int]:
    summary = summarize(io.BytesIO(capture), local_addresses=[VM])
    (peer,) = (p for p in summary.peers if p.address == PEER)
    return {p.port for p in peer.remote_ports if p.protocol == "udp"}


class TestCapsCrossed:
    """At a cap the documented behaviour holds; one past it, the cap acts."""

    def test_fragments_pending_up_to_ten_thousand(self) -> None:
        # 10,000 pending first fragments: the trailing one still finds its ports
        assert udp_ports_of_peer(fragment_flood(10_000)) == {9000}
        # one more and the table is emptied: the trailing fragment's ports are unknown (0)
        assert udp_ports_of_peer(fragment_flood(10_001)) == {0, 9000}

    def test_http_head_read_up_to_8_kib(self) -> None:
        host_line = b"Host: edge.example\r\n"

        def request(length: int) -> bytes:
            """A request whose Host line ends at byte ``length`` (its newline included)."""
            start = b"GET / HTTP/1.1\r\n"
            pad_line = length - len(start) - len(host_line)
            pad = b"X-Pad: " + b"p" * (pad_line - len(b"X-Pad: \r\n")) + b"\r\n"
            data = start + pad + host_line
            assert len(data) == length
            return data + b"\r\n"

        assert names.http_host(request(8 * KIB)) == "edge.example"
        assert names.http_host(request(8 * KIB + 1)) is None


class TestAttemptsCrossed:
    """A blob whose runs keep dying is given up after 20 of them, not before."""

    @pytest.mark.parametrize(("deaths", "status"), [(19, "complete"), (20, "failed")])
    def test_runs_that_die(
        self,
        deaths: int,
        status: str,
        captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        name = network_watcher_path("vm-dying")
        captures_container.upload_blob(name, udp_capture({"20.0.0.1": (1, 1)}))
        blob = captures_container.get_blob_client(name)
        dying = DyingStore(results_store)
        for _ in range(deaths):
            with pytest.raises(Killed):
                process_blob(blob, dying)
        outcome = process_blob(blob, results_store)
        assert outcome.status == status
        if status == "failed":
            assert "gave up after 20 runs" in outcome.detail
