"""Table keys and property limits: escaping free text into keys, canonical peer keys, capture
ids, and fitting values into Table Storage's property and entity limits.

Keys hold no ``/ \\ # ?`` or control characters: free text goes through :func:`escape_key`.
Every key built from input is bounded (:data:`MAX_KEY_CHARS`), well under the 1 KiB limit.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from azure.data.tables import EntityProperty

from analyzer.base.models import SEVERITY_ORDER, Alert, iso_time
from analyzer.store.blobpath import CaptureLocation

TABLES = ("captures", "peers", "alerts", "peerindex", "baseline")
MAX_PROPERTY_BYTES = 64 * 1024
MAX_ENTITY_BYTES = 1024 * 1024
MAX_BATCH_ENTITIES = 100
MAX_BATCH_BYTES = 4 * 1024 * 1024
# Room left for the property name, type annotations and the batch's multipart framing.
PROPERTY_BUDGET = MAX_PROPERTY_BYTES - 1024
BATCH_BUDGET = MAX_BATCH_BYTES - 512 * 1024
MAX_PAGE = 1000
# Table Storage takes keys up to 1 KiB (512 UTF-16 characters); free text in a key is cut to
# this many characters (an escaped character takes up to 12) and a digest keeps it unique.
MAX_KEY_TEXT = 120
# Edm.DateTime holds 1601-01-01 .. 9999-12-31 (UTC); a time outside that is stored as none.
_EARLIEST = datetime(1601, 1, 1, tzinfo=timezone.utc).timestamp()
_LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()

_KEY_SAFE = re.compile(r"[A-Za-z0-9._-]")
# A dotted IPv4 address as ipaddress writes it (no leading zeros): its own key.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_CAPTURE_ID = re.compile(r"^(?P<vm>[A-Za-z0-9._~-]{1,120})\.(?P<digest>[0-9a-f]{20})$")
DAY_PREFIX = "day-"
# One partitioning scheme for every table a capture writes to (docs/data-model.md, "Keys"):
# a partition holds what is read together, and no partition takes more than a capture's share
# of a burst. Azure Table Storage serves about 2,000 entities/s per partition and 20,000 per
# account, so the fleet-wide tables need at least 10 partitions each to reach the account's
# limit; they get more, so that one hot address or one busy capture stays far from a
# partition's limit.
#
# peerindex: 256 partitions, "bucket-{aa}-{cc}": one of 16 buckets by a hash of the address,
# times one of 16 shards by a hash of the capture id. A capture's index rows then go to at most
# 16 partitions (a transaction per 100 rows in each), a burst of captures spreads over all 256,
# and "who talked to X" reads one key range in each of its bucket's 16 partitions (and in the
# bucket's partition of the layout before issue #20, "bucket-{aa}").
INDEX_ADDRESS_BUCKETS = 16
INDEX_CAPTURE_SHARDS = 16
INDEX_BUCKETS = INDEX_ADDRESS_BUCKETS * INDEX_CAPTURE_SHARDS
INDEX_PREFIX = "bucket-"
CAPTURE_ALERTS_PREFIX = "capture-"
# alerts by day: a day's rows over 16 shards by a hash of the capture id, so that a fleet's
# burst spreads over 16 partitions while one capture's day rows still share a transaction.
DAY_SHARDS = 16
# peers: a capture's peers, sorted by key, 100 to a partition (one full transaction each);
# a wide capture spreads over as many partitions as it needs, and its pages stay in key order.
PEERS_PER_PARTITION = 100
# baseline: a VM's rows over a number of shards fixed at its first capture (a power of two,
# about 100 peers per shard then, at most 256), recorded in its marker row.
BASELINE_ROWS_PER_SHARD = 100
MAX_BASELINE_SHARDS = 256


# --- keys --------------------------------------------------------------------------------


def escape_key(text: str) -> str:
    """``text`` with everything but ``A-Z a-z 0-9 . _ -`` written as ``~XX`` (UTF-8 bytes).

    Reversible and safe in table keys and URL paths: no ``/ \\ # ?``, ``%`` or control characters.
    """
    return "".join(
        char if _KEY_SAFE.match(char) else "".join(f"~{byte:02X}" for byte in char.encode())
        for char in text
    )


def ip_key(address: str) -> str:
    """The canonical key of an IP address: dotted IPv4, or IPv6 with every group in full and
    ``-`` between groups (``2001-0db8-0000-...``), so that any spelling of one address meets
    the same row. Anything that is not an IP address is escaped as it is."""
    if _CANONICAL_IPV4.fullmatch(address):  # the common case, without ipaddress's parsing
        return address
    try:
        parsed = ipaddress.ip_address(address.strip())
    except ValueError:
        return bounded_key(escape_key(address))
    if isinstance(parsed, ipaddress.IPv4Address):
        return str(parsed)
    key = ipaddress.IPv6Address(int(parsed)).exploded.replace(":", "-")
    return key + escape_key(f"%{parsed.scope_id}") if parsed.scope_id else key


def vm_key(vm: str) -> str:
    """The captures partition of a VM: its name in lower case (Azure VM names ignore case)."""
    return bounded_key(escape_key(vm.lower())) or "unknown"


def capture_id_for(location: CaptureLocation) -> str:
    """A capture's id: ``{vm key}.{20 hex digits of SHA-256 of container/name}``.

    Stable for a blob path whatever its content, readable, safe in keys and URLs, and it
    names the captures partition, so that one capture is one point read.
    """
    digest = hashlib.sha256(location.path.encode()).hexdigest()[:20]
    return f"{vm_key(location.vm)}.{digest}"


def parse_capture_id(capture_id: str) -> str:
    """The VM key a capture id starts with; ``ValueError`` when it is not a capture id."""
    match = _CAPTURE_ID.match(capture_id)
    if match is None:
        raise ValueError(f"not a capture id: {capture_id!r}")
    return match.group("vm")


def baseline_key(location: CaptureLocation) -> str:
    """The baseline partition of a VM: subscription, resource group and VM, lower case."""
    parts = (location.subscription, location.resource_group, location.vm)
    return "|".join(bounded_key(escape_key(part.lower())) for part in parts)


def bounded_key(key: str, limit: int = MAX_KEY_TEXT) -> str:
    """``key`` if it has at most ``limit`` characters, else its start and a digest of all of it.

    A blob path or a capture chooses the text in keys; Table Storage refuses keys over 1 KiB,
    and it would refuse them only after other rows of the capture were written.
    """
    if len(key) <= limit:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return f"{key[: limit - len(digest) - 1]}.{digest}"


def storable_time(ts: float | None) -> float | None:
    """``ts`` when Edm.DateTime can hold it (1601 to 9999, finite), else ``None``."""
    if ts is None or not math.isfinite(ts) or not _EARLIEST <= ts <= _LATEST:
        return None
    return ts


def time_key(ts: float) -> str:
    """A time as it sorts in row keys: ISO 8601 UTC with microseconds."""
    return iso_time(storable_time(ts)) or ""


def day_partition(ts: float) -> str:
    """The day of ``ts`` as the start of its ``alerts`` partitions: ``day-YYYY-MM-DD``."""
    moment = storable_time(ts)
    if moment is None:
        raise ValueError(f"no date holds the time {ts!r}")
    return DAY_PREFIX + datetime.fromtimestamp(moment, tz=timezone.utc).strftime("%Y-%m-%d")


def day_shard_partition(ts: float, capture_id: str) -> str:
    """The by-day ``alerts`` partition of a capture's alerts: ``day-YYYY-MM-DD|nn``, one of
    :data:`DAY_SHARDS` by a hash of the capture id."""
    return f"{day_partition(ts)}|{shard_of(capture_id, DAY_SHARDS):02d}"


def shard_of(key: str, count: int) -> int:
    """A stable shard number of ``key`` in ``range(count)`` (not Python's salted ``hash``)."""
    digest = hashlib.blake2b(key.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % count


def peer_partition(capture_id: str, generation: int, chunk: int) -> str:
    """The ``peers`` partition of the ``chunk``-th 100 peers (by key) of a capture's run."""
    return f"{capture_id}|{generation:08d}|{chunk:05d}"


def peer_partitions_of_run(capture_id: str, generation: int) -> tuple[str, str]:
    """The ``[low, high)`` partition key range of a run's ``peers`` partitions."""
    return f"{capture_id}|{generation:08d}|", f"{capture_id}|{generation:08d}}}"


def peer_partitions_below(capture_id: str, below: int) -> tuple[str, str]:
    """The ``[low, high)`` partition key range of the ``peers`` partitions of runs before
    ``below`` (the capture's own partition, from before issue #20, is not in it)."""
    return f"{capture_id}|", f"{capture_id}|{below:08d}|"


def baseline_shards_for(peers: int) -> int:
    """How many shards a VM's baseline gets when its first capture shows ``peers`` peers."""
    shards = 1
    while shards * BASELINE_ROWS_PER_SHARD < peers and shards < MAX_BASELINE_SHARDS:
        shards *= 2
    return shards


def baseline_partition(vm_partition: str, peer_key: str, shards: int) -> str:
    """The baseline partition of a peer of a VM whose baseline has ``shards`` shards (0: one
    partition, the VM's key, as before issue #20)."""
    if shards <= 0:
        return vm_partition
    return f"{vm_partition}|{shard_of(peer_key, shards):03d}"


def alert_key(alert: Alert, occurrence: int) -> str:
    """An alert's row key within its capture, highest severity first."""
    rank = 4 - SEVERITY_ORDER.get(alert.severity, 0)
    rule = bounded_key(escape_key(alert.rule))
    return f"{rank}|{rule}|{ip_key(alert.peer)}|{occurrence:03d}"


def generation_prefix(generation: int) -> str:
    """The start of the row keys a run of ``generation`` writes in a capture's partitions."""
    return f"{generation:08d}|"


def generation_of(row_key: str) -> int | None:
    """The generation a result row key starts with, ``None`` for another kind of key."""
    head, sep, _ = row_key.partition("|")
    return int(head) if sep and len(head) == 8 and head.isdigit() else None


def legacy_index_partition(address_key: str) -> str:
    """The address's bucket, ``bucket-{aa}``: where the layout before issue #20 put all its
    index rows, and the start of its partitions since."""
    digest = hashlib.blake2b(address_key.encode(), digest_size=2).digest()
    return f"{INDEX_PREFIX}{int.from_bytes(digest, 'big') % INDEX_ADDRESS_BUCKETS:02d}"


def index_partition(address_key: str, capture_id: str) -> str:
    """The ``peerindex`` partition of an address's row of a capture: its bucket and the
    capture's shard, one of :data:`INDEX_BUCKETS`."""
    shard = shard_of(capture_id, INDEX_CAPTURE_SHARDS)
    return f"{legacy_index_partition(address_key)}-{shard:02d}"


def index_partitions_of(address_key: str) -> list[str]:
    """Every ``peerindex`` partition that may hold rows of an address: its bucket's 16
    shards, then its bucket's partition of the layout before issue #20."""
    bucket = legacy_index_partition(address_key)
    return [f"{bucket}-{shard:02d}" for shard in range(INDEX_CAPTURE_SHARDS)] + [bucket]


def peer_row_key(generation: int, address: str) -> str:
    """A peer's row key in its capture's partition: the run's generation, then the peer key."""
    return generation_prefix(generation) + ip_key(address)


def table_names(prefix: str = "") -> dict[str, str]:
    """Logical table name → actual name (letters and digits only, as Table Storage requires)."""
    if prefix and not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,40}", prefix):
        raise ValueError(f"a table prefix must be letters and digits: {prefix!r}")
    return {name: f"{prefix}{name}" for name in TABLES}


# --- fitting values into properties ------------------------------------------------------


def utf16_size(text: str) -> int:
    """Bytes ``text`` takes in Table Storage, which counts strings in UTF-16."""
    # isascii() reads a flag CPython keeps: ASCII text takes 2 bytes a character, no encoding.
    return 2 * len(text) if text.isascii() else len(text.encode("utf-16-le"))


# One encoder for every property (json.dumps with options builds a new one per call).
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _dumps(value: Any) -> str:
    return _JSON.encode(value)


def fit_text(text: str, budget: int = PROPERTY_BUDGET) -> tuple[str, bool]:
    """``text`` cut to ``budget`` bytes with a ``… [cut N characters]`` marker when needed."""
    if utf16_size(text) <= budget:
        return text, False
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        candidate = f"{text[:middle]}… [cut {len(text) - middle} characters]"
        if utf16_size(candidate) <= budget:
            low = middle
        else:
            high = middle - 1
    return f"{text[:low]}… [cut {len(text) - low} characters]", True


def fit_json(value: list[Any] | dict[str, Any], budget: int = PROPERTY_BUDGET) -> tuple[str, bool]:
    """``value`` as JSON in at most ``budget`` bytes.

    A list too long keeps its first items and ends with ``{"truncated": N}`` (``"… N more"``
    in a list of strings); a mapping keeps its first keys and gets ``"…truncated": N``.
    """
    text = _dumps(value)
    if utf16_size(text) <= budget:
        return text, False
    items: list[Any] = list(value.items()) if isinstance(value, dict) else list(value)

    def shortened(keep: int) -> str:
        left = len(items) - keep
        if isinstance(value, dict):
            return _dumps({**dict(items[:keep]), "…truncated": left})
        if all(isinstance(item, str) for item in items):
            return _dumps([*items[:keep], f"… {left} more"])
        return _dumps([*items[:keep], {"truncated": left}])

    low, high = 0, len(items) - 1
    while low < high:
        middle = (low + high + 1) // 2
        if utf16_size(shortened(middle)) <= budget:
            low = middle
        else:
            high = middle - 1
    text = shortened(low)
    if utf16_size(text) > budget:  # a single item bigger than a property: keep the marker only
        text = shortened(0)
    return text, True


def entity_size(entity: Mapping[str, Any]) -> int:
    """An upper bound of an entity's size as Table Storage counts it."""
    size = 4 + 8 * len(entity)
    for name, value in entity.items():
        size += utf16_size(name)
        raw = value.value if isinstance(value, EntityProperty) else value
        if isinstance(raw, str):
            size += 4 + utf16_size(raw)
        elif isinstance(raw, bytes):
            size += 4 + len(raw)
        else:
            size += 8
    return size

