"""Where a stored capture's packets are: its blob, as an Azure portal link and the
``az storage blob download`` command that fetches it.

Blob names are chosen by whoever writes the capture container: the command quotes every value
for a POSIX shell (:func:`shlex.quote`) and passes a value that starts with ``-`` as
``--option=value``; the suggested file name keeps only ``[A-Za-z0-9._-]``. The portal link needs
the capture account's resource id, which the blob's URL does not carry: it is made only when
the optional setting ``CAPTURES_ACCOUNT_ID`` names that account.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

ACCOUNT_ID_SETTING = "CAPTURES_ACCOUNT_ID"
PORTAL = "https://portal.azure.com/#resource"
_ACCOUNT_NAME = re.compile(r"[a-z0-9]{3,24}")
_ACCOUNT_ID = re.compile(
    r"/subscriptions/[0-9a-f-]{36}/resourceGroups/[-\w.()]{1,90}"
    r"/providers/Microsoft\.Storage/storageAccounts/([a-z0-9]{3,24})",
    re.IGNORECASE,
)
_UNSAFE_FILE_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_FILE_NAME = 120


@dataclass(frozen=True)
class BlobReference:
    """A capture blob, and how to reach it."""

    url: str
    account: str
    container: str
    name: str
    file: str  # a local file name for the download
    download_command: str
    portal_url: str  # "" unless the account's resource id is known


def local_file_name(blob_name: str) -> str:
    """The blob name's last part, reduced to characters safe in any shell and file system."""
    last = blob_name.rsplit("/", 1)[-1]
    safe = _UNSAFE_FILE_CHARACTERS.sub("_", last).lstrip(".-_")[:MAX_FILE_NAME]
    return safe or "capture.cap"


def _option(name: str, value: str) -> str:
    if value.startswith("-"):
        return shlex.quote(f"{name}={value}")
    return f"{name} {shlex.quote(value)}"


def download_command(account: str, container: str, name: str, file: str, endpoint: str = "") -> str:
    """``az storage blob download ... --auth-mode login``, every value quoted."""
    parts = [
        "az storage blob download",
        _option("--account-name", account),
        _option("--container-name", container),
        _option("--name", name),
        _option("--file", file),
        "--auth-mode login",
    ]
    if endpoint:
        parts.append(_option("--blob-endpoint", endpoint))
    return " ".join(parts)


def portal_url(account_id: str, account: str) -> str:
    """The account's containers in the Azure portal, when ``account_id`` is that account's
    resource id; else ``""``."""
    match = _ACCOUNT_ID.fullmatch(account_id.strip())
    if not match or match.group(1).lower() != account:
        return ""
    return f"{PORTAL}{quote(account_id.strip(), safe='/')}/containersList"


def blob_reference(capture: Mapping[str, Any], account_id: str = "") -> BlobReference | None:
    """The reference of a stored capture (the API's ``capture`` object), or ``None`` when its
    blob URL names no storage account."""
    url = str(capture.get("blob_url") or "")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return None
    host = parts.hostname.lower()
    path = [unquote(p) for p in parts.path.split("/") if p]
    endpoint = ""
    first, _, rest = host.partition(".")
    if rest.startswith("blob."):  # account.blob.core.windows.net, or a sovereign cloud's
        account = first
    elif path:  # path style, as Azurite: http://127.0.0.1:10000/devstoreaccount1/container/...
        account = path.pop(0)
        endpoint = f"{parts.scheme}://{parts.netloc}/{account}"
    else:
        return None
    if not _ACCOUNT_NAME.fullmatch(account):
        return None
    container = str(capture.get("container") or (path[0] if path else ""))
    name = str(capture.get("blob_name") or "/".join(path[1:]))
    if not container or not name:
        return None
    file = local_file_name(name)
    return BlobReference(
        url=url,
        account=account,
        container=container,
        name=name,
        file=file,
        download_command=download_command(account, container, name, file, endpoint),
        portal_url=portal_url(account_id, account),
    )


def extract_command(capture_id: str) -> str:
    """``nwcap extract``: one peer's packets of the stored capture as a pcap (the peer and file
    left for the reader to fill in)."""
    return f"nwcap extract {_option('--capture-id', capture_id)} --peer PEER_IP -o peer.pcap"
