"""``nwcap extract``: one peer's (or one conversation's) packets, back to a file for Wireshark.

From a capture file (any format nwcap reads) or a stored capture's blob (``--capture-id``,
found through the results store), streamed: memory does not grow with the capture. The output
is written next to its final name and renamed when complete, so that a failure leaves no
half-written file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

from analyzer.cli.common import (
    captures_connection_option,
    command,
    error,
    guarded,
    ip_address,
    results_store_options,
)
from analyzer.cli.exits import EXIT_CANTCREAT, EXIT_USAGE, InputError, NotFoundError

EXAMPLES = [
    (
        "nwcap extract samples/inbound-scan.cap --peer 175.16.199.77 -o scanner.pcap",
        "everything the VM exchanged with one peer, to open in Wireshark",
    ),
    (
        "nwcap extract capture.cap --peer 89.160.20.112 --port 22 -o ssh.pcapng",
        "one peer's SSH traffic (TCP or UDP port 22, either side), as pcapng",
    ),
    (
        "nwcap extract --capture-id <capture-id> --peer 20.150.90.4 -o storage.pcap",
        "from a stored capture's blob (the results store says where it is)",
    ),
]


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``extract``."""
    extract = command(
        subparsers,
        "extract",
        help="write one peer's (or conversation's) packets to a pcap file",
        description="Write the packets Wireshark's display filter ip.addr == PEER (with --port: "
        "&& (tcp.port == P || udp.port == P)) shows to a pcap file (pcapng when the name ends "
        "in .pcapng), from a capture file or a stored capture's blob.",
        examples=EXAMPLES,
    )
    extract.add_argument("capture", nargs="?", help="capture file, or - for standard input")
    extract.add_argument("--capture-id", help="a stored capture, as listed by 'nwcap captures'")
    extract.add_argument(
        "--peer", required=True, type=ip_address, metavar="IP", help="the peer's address"
    )
    extract.add_argument(
        "--port", type=_port, metavar="P", help="only its packets with this TCP or UDP port"
    )
    extract.add_argument(
        "-o",
        "--output-file",
        required=True,
        metavar="FILE",
        help="the file to write: .pcapng for pcapng, else pcap",
    )
    results_store_options(extract)
    captures_connection_option(extract)
    extract.set_defaults(func=guarded(run_extract))


def run_extract(args: argparse.Namespace) -> int:
    from analyzer.capture.extract import Selection, extract  # noqa: PLC0415 - fast --help

    if (args.capture is None) == (args.capture_id is None):
        error("error: give either a capture file or --capture-id")
        return EXIT_USAGE
    target = Path(args.output_file)
    if args.capture not in (None, "-") and _same_file(Path(args.capture), target):
        error("error: the output file is the capture itself")
        return EXIT_USAGE
    selection = Selection(args.peer, args.port)
    with _source(args) as (stream, name):
        try:
            out = tempfile.NamedTemporaryFile(  # noqa: SIM115 - renamed or removed below
                dir=target.parent if str(target.parent) else ".",
                prefix=f".{target.name}.",
                suffix=".part",
                delete=False,
            )
        except OSError as problem:
            error(f"error: cannot write {target}: {problem.strerror or problem}")
            return EXIT_CANTCREAT
        try:
            with out:
                pcapng = target.suffix.lower() == ".pcapng"
                result = extract(stream, cast(BinaryIO, out), selection, pcapng=pcapng)
            os.replace(out.name, target)
        except OSError as problem:
            _remove(out.name)
            error(f"error: cannot write {target}: {problem.strerror or problem}")
            return EXIT_CANTCREAT
        except BaseException:
            _remove(out.name)
            raise
    for warning in result.warnings:
        error(f"warning: {name}: {warning}")
    error(
        f"wrote {result.packets:,} of {result.frames_read:,} packets ({result.bytes:,} bytes) "
        f"to {target}; the same in the whole capture: {selection.display_filter}"
    )
    return 0


@contextlib.contextmanager
def _source(args: argparse.Namespace) -> Iterator[tuple[BinaryIO, str]]:
    """The capture's bytes and a name for messages: a file, standard input, or a blob."""
    if args.capture_id is None:
        if args.capture == "-":
            yield sys.stdin.buffer, "standard input"
            return
        try:
            stream = Path(args.capture).open("rb")  # noqa: SIM115 - closed below
        except OSError as problem:
            raise InputError(f"cannot open {args.capture}: {problem.strerror or problem}") from None
        with stream:
            yield stream, args.capture
        return
    from azure.core.exceptions import ResourceNotFoundError  # noqa: PLC0415 - storage only

    from analyzer.cli.common import captures_connection, results_store  # noqa: PLC0415
    from analyzer.store.blobstream import open_blob_stream  # noqa: PLC0415
    from analyzer.store.connections import blob_service_for  # noqa: PLC0415

    record = results_store(args).get_capture(args.capture_id)
    if record is None:
        raise NotFoundError(f"no stored capture {args.capture_id!r} (see 'nwcap captures')")
    where = record.location
    service = blob_service_for(captures_connection(args))
    blob = service.get_container_client(where.container).get_blob_client(where.name)
    try:
        properties = blob.get_blob_properties()
    except ResourceNotFoundError:
        raise NotFoundError(
            f"the blob of capture {args.capture_id!r} is gone: {where.path}"
        ) from None
    if record.blob_etag and properties.etag != record.blob_etag:
        error(f"warning: {where.path} changed since it was analysed; extracting what it is now")
    with open_blob_stream(blob, etag=str(properties.etag), size=int(properties.size)) as stream:
        yield stream, where.path


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535)")
    return port


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def _remove(name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name)
