"""Start and stop the project's pinned Azurite storage emulator, its data in a temporary folder.

From Python (tests, scripts)::

    with running() as azurite:
        BlobServiceClient.from_connection_string(azurite.connection_string)

From a shell (the demo)::

    conn="$(python scripts/azurite.py start --state /tmp/azurite.json)"
    python scripts/azurite.py stop --state /tmp/azurite.json

``start`` prints the connection string on stdout. It listens on the standard ports
10000-10002 when ``--default-ports`` is given (so ``UseDevelopmentStorage=true`` works, e.g.
for ``func start``), otherwise on free ports so that several runs never collide.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AZURITE = ROOT / "node_modules" / ".bin" / "azurite"
ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key, published in its documentation: not a secret.
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
DEFAULT_PORTS = (10000, 10001, 10002)
DEFAULT_STATE = Path(tempfile.gettempdir()) / "nwcap-azurite.json"
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class Azurite:
    """A running Azurite: where it listens, where its data lives, and its process id."""

    blob_port: int
    queue_port: int
    table_port: int
    data_dir: Path
    pid: int
    host: str = "127.0.0.1"

    @property
    def connection_string(self) -> str:
        base = f"http://{self.host}"
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={base}:{self.blob_port}/{ACCOUNT};"
            f"QueueEndpoint={base}:{self.queue_port}/{ACCOUNT};"
            f"TableEndpoint={base}:{self.table_port}/{ACCOUNT};"
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "blob_port": self.blob_port,
                "queue_port": self.queue_port,
                "table_port": self.table_port,
                "data_dir": str(self.data_dir),
                "pid": self.pid,
                "host": self.host,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Azurite:
        raw = json.loads(text)
        return cls(
            blob_port=int(raw["blob_port"]),
            queue_port=int(raw["queue_port"]),
            table_port=int(raw["table_port"]),
            data_dir=Path(raw["data_dir"]),
            pid=int(raw["pid"]),
            host=str(raw["host"]),
        )


def _free_ports() -> tuple[int, int, int]:
    sockets = []
    try:
        for _ in range(3):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        blob, queue, table = (int(sock.getsockname()[1]) for sock in sockets)
        return blob, queue, table
    finally:
        for sock in sockets:
            sock.close()


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _answers(port: int) -> bool:
    """True once Azurite answers on ``port``: any status code will do, but the answer must
    come from Azurite (its ``Server`` header, ``Azurite-Blob/3.35.0`` and the like), not from
    whatever else took the port meanwhile."""
    url = f"http://127.0.0.1:{port}/{ACCOUNT}?comp=list"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            server = response.headers.get("Server", "")
    except urllib.error.HTTPError as error:
        server = error.headers.get("Server", "")
    except OSError:
        return False
    return str(server).startswith("Azurite-")


def _launch(ports: tuple[int, int, int], data_dir: Path) -> subprocess.Popen[bytes]:
    if not AZURITE.exists():
        raise RuntimeError(f"{AZURITE} is missing: run scripts/setup.sh (npm install) first")
    blob, queue, table = ports
    log = (data_dir / "azurite.log").open("wb")
    command = [
        str(AZURITE),
        "--silent",
        "--skipApiVersionCheck",
        "--loose",
        "--disableTelemetry",
        "--location",
        str(data_dir),
        "--blobPort",
        str(blob),
        "--queuePort",
        str(queue),
        "--tablePort",
        str(table),
    ]
    try:
        # A session of its own, so that a Ctrl-C in the caller's terminal does not reach it
        # before the caller had a chance to stop it cleanly.
        return subprocess.Popen(  # noqa: S603 (fixed command, no shell)
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    finally:
        log.close()


def _stop_process(pid: int, timeout: float = 10.0) -> None:
    """Interrupt ``pid`` (Azurite closes cleanly on SIGINT), killing it if it lingers."""
    child = _children.pop(pid, None)
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    if child is not None:
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def start(*, default_ports: bool = False, timeout: float = 30.0, attempts: int = 3) -> Azurite:
    """Start Azurite in a new temporary folder and return once all its services answer."""
    last_error = "not started"
    for _ in range(attempts):
        ports: tuple[int, int, int]
        if default_ports:
            busy = [port for port in DEFAULT_PORTS if _port_in_use(port)]
            if busy:
                raise RuntimeError(f"ports {busy} are in use: is another Azurite running?")
            ports = DEFAULT_PORTS
        else:
            ports = _free_ports()
        data_dir = Path(tempfile.mkdtemp(prefix="nwcap-azurite-"))
        process = _launch(ports, data_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if all(_answers(port) for port in ports):
                _children[process.pid] = process
                return Azurite(*ports, data_dir=data_dir, pid=process.pid)
            time.sleep(0.2)
        # Exited (a port taken between choosing and binding it) or never answered: retry.
        log = (data_dir / "azurite.log").read_text(errors="replace")[-2000:]
        last_error = f"exit code {process.poll()}, log: {log}"
        _children[process.pid] = process
        _stop_process(process.pid)
        shutil.rmtree(data_dir, ignore_errors=True)
    raise RuntimeError(f"Azurite did not start: {last_error}")


def stop(azurite: Azurite) -> None:
    """Stop Azurite and delete its data folder."""
    _stop_process(azurite.pid)
    shutil.rmtree(azurite.data_dir, ignore_errors=True)


@contextlib.contextmanager
def running(*, default_ports: bool = False) -> Iterator[Azurite]:
    """Azurite for the duration of a ``with`` block."""
    azurite = start(default_ports=default_ports)
    try:
        yield azurite
    finally:
        stop(azurite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop"])
    parser.add_argument(
        "--state",
        type=Path,
        default=DEFAULT_STATE,
        help=f"file recording the running instance (default {DEFAULT_STATE})",
    )
    parser.add_argument(
        "--default-ports",
        action="store_true",
        help="listen on 10000-10002 so that UseDevelopmentStorage=true reaches it",
    )
    args = parser.parse_args(argv)
    if args.command == "start":
        if args.state.exists():
            print(f"{args.state} exists: stop that instance first", file=sys.stderr)
            return 1
        azurite = start(default_ports=args.default_ports)
        args.state.write_text(azurite.to_json())
        print(
            f"Azurite {azurite.pid} on blob {azurite.blob_port}, table {azurite.table_port},"
            f" data in {azurite.data_dir}",
            file=sys.stderr,
        )
        print(azurite.connection_string)
        return 0
    if not args.state.exists():
        print(f"{args.state} does not exist: nothing to stop", file=sys.stderr)
        return 1
    stop(Azurite.from_json(args.state.read_text()))
    args.state.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
