"""A SuperNode's resident trainer: ESPnet imported and the `LocalTrainer` built once per node.

A deployed SuperNode runs every message in a fresh `flwr-clientapp` process. Importing torch
and ESPnet's ASR task there costs several CPU-seconds per message, as much as a client's local
round. So the launcher starts each SuperNode under this process:

    python -m fl_lib.flower.node_trainer --socket S --clients <node>/clients.jsonl -- flower-supernode ...

It listens on the Unix socket S, starts the SuperNode as its child (one process group: a node
killed is its trainer killed too; and on Linux the SuperNode dies with its trainer), then imports
ESPnet and reads its clients (requests wait in the socket's backlog meanwhile; the fork comes
before torch's threads), creates `S.ready` (`ready_file`: what the launcher waits for, so a trainer
that fails there is a start-up error, not a node whose tasks never come back), and exits with the
SuperNode's status. The
ClientApp, started with `trainer="S"` in its node config, imports only Flower: it hands the
train message's content to this process and returns its reply. The training itself is the
ClientApp's own (`client_app.train_reply`), so the model is the same, bit for bit, whichever
process trains.

The trainer answers one task at a time; a second ClientApp of the node waits in the socket's
backlog. A ClientApp waits no longer than its message lives (Flower's TTL, the server's round
timeout), and a task whose ClientApp went away while it waited is skipped, not trained. The wire: a request is the message's
`RecordDict` as Flower's protobuf, length-prefixed; a reply is a status byte (0: the reply's
protobuf, 1: the error's text) and its length-prefixed payload.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

logger = logging.getLogger("fl_lib.flower.node_trainer")
_LEN = struct.Struct(">Q")
OK, ERROR = b"\x00", b"\x01"
REQUEST_TIMEOUT = 600.0  # seconds a connected ClientApp may take to send its request
MAX_SOCKET_PATH = 107  # AF_UNIX: sun_path holds 108 bytes with the terminating NUL


class NodeTrainerError(RuntimeError):
    """The resident trainer failed the task (its traceback is the message), or could not be reached."""


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = conn.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError(f"the peer closed the connection after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _send_frame(conn: socket.socket, payload: bytes) -> None:
    conn.sendall(_LEN.pack(len(payload)) + payload)


def _recv_frame(conn: socket.socket) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(conn, _LEN.size))
    return _recv_exact(conn, n)


def to_bytes(content: RecordDict) -> bytes:
    return recorddict_to_proto(content).SerializeToString()


def from_bytes(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def request(socket_path: Path, content: RecordDict, timeout: Optional[float] = None) -> RecordDict:
    """The ClientApp's side: the train content to the node's resident trainer, its reply back
    within `timeout` seconds in all (None: no limit)."""
    deadline = None if timeout is None else time.monotonic() + timeout

    def left() -> Optional[float]:
        if deadline is None:
            return None
        return max(deadline - time.monotonic(), 1e-3)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        try:  # blocking: a non-blocking AF_UNIX connect to a full backlog fails at once instead of waiting
            conn.connect(str(socket_path))
        except OSError as e:
            raise NodeTrainerError(f"the node's resident trainer at {socket_path} is not reachable: {e}") from None
        try:
            _send_frame(conn, to_bytes(content))
            conn.settimeout(left())
            status = _recv_exact(conn, 1)
            conn.settimeout(left())
            payload = _recv_frame(conn)
        except TimeoutError:
            raise NodeTrainerError(f"the node's resident trainer at {socket_path} did not reply within {timeout:.0f} s") from None
        except OSError as e:  # ConnectionError included: the trainer died or was killed mid-task
            raise NodeTrainerError(f"the node's resident trainer at {socket_path} went away mid-task: {e}") from None
    if status != OK:
        raise NodeTrainerError(f"the node's resident trainer failed the task:\n{payload.decode('utf-8', 'replace')}")
    return from_bytes(payload)


def _peer_gone(conn: socket.socket) -> bool:
    """Whether the ClientApp has closed its end (it timed out, or was killed) while its request waited."""
    timeout = conn.gettimeout()
    conn.settimeout(0.0)
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:  # open, and nothing more to read: it waits for the reply
        return False
    except OSError:
        return True
    finally:
        conn.settimeout(timeout)


class ResidentTrainer:
    """Serves train requests for one node's clients; keeps the last setup's `LocalTrainer`."""

    def __init__(self, index: Path) -> None:
        from ..data.clients import load_clients
        from ..espnet_env import asr_task

        asr_task()  # the import every per-message ClientApp would pay, paid once here
        self.index = Path(index)
        self.clients = {c.id: c for c in load_clients(self.index)}
        self.trainers: dict = {}  # setup key -> LocalTrainer: the server sends one setup per experiment

    def handle(self, content: RecordDict) -> RecordDict:
        from .client_app import train_reply

        return train_reply(content, self.index, self.clients, self.trainers)

    def serve(self, listener: socket.socket, node: Optional[subprocess.Popen] = None) -> None:
        """Answer requests until `node` (the SuperNode) exits; with no node, until the listener is closed."""
        listener.settimeout(1.0)
        while node is None or node.poll() is None:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:  # the listener was closed
                return
            with conn:
                conn.settimeout(REQUEST_TIMEOUT)  # a ClientApp that stalls mid-request does not hold the node forever
                try:
                    data = _recv_frame(conn)
                except OSError as e:
                    logger.warning("a ClientApp went away before its request arrived: %s", e)
                    continue
                if _peer_gone(conn):
                    logger.warning("a ClientApp went away while its request waited: its task is skipped")
                    continue
                start = time.monotonic()
                try:
                    content = from_bytes(data)
                    client = content.config_records["task"]["client-id"]
                    status, payload = OK, to_bytes(self.handle(content))
                except (Exception, SystemExit):  # SystemExit: ESPnet's parsers exit on a bad option. The ClientApp
                    # turns it into Flower's error reply, the server into a failed client; the trainer serves on
                    status, payload = ERROR, traceback.format_exc().encode()
                    logger.error("task failed:\n%s", payload.decode())
                else:
                    logger.info("trained client %s in %.1f s", client, time.monotonic() - start)
                try:
                    conn.sendall(status)
                    _send_frame(conn, payload)
                except OSError as e:  # its ClientApp was killed meanwhile: nobody waits for this reply
                    logger.warning("the ClientApp went away before its reply was sent: %s", e)


def die_with(parent: int):
    """The SuperNode's `preexec_fn`: SIGKILL when its trainer dies (Linux's PR_SET_PDEATHSIG), so a
    trainer killed alone does not leave a node whose every task fails. `prctl` is looked up here,
    before the fork; a trainer that died before the child set the signal is caught by its parent pid."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    PR_SET_PDEATHSIG = 1

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def ready_file(socket_path: Path) -> Path:
    """Exists once the trainer behind `socket_path` has imported ESPnet and read its clients."""
    return Path(socket_path).with_name(Path(socket_path).name + ".ready")


def listen(socket_path: Path) -> socket.socket:
    socket_path = Path(socket_path)
    if len(str(socket_path)) > MAX_SOCKET_PATH:
        raise ValueError(f"a Unix socket path holds at most {MAX_SOCKET_PATH} bytes, {socket_path} has {len(str(socket_path))}")
    socket_path.unlink(missing_ok=True)
    ready_file(socket_path).unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    listener.listen(socket.SOMAXCONN)
    return listener


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m fl_lib.flower.node_trainer --socket S --clients INDEX -- flower-supernode ...")
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", type=Path, required=True, help="the Unix socket the node's ClientApps connect to")
    p.add_argument("--clients", type=Path, required=True, help="the node's clients.jsonl (its own clients only)")
    args = p.parse_args(argv[:split])
    node_cmd = argv[split + 1:]
    if not node_cmd:
        p.error("no SuperNode command after --")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s")
    if not args.clients.is_file():
        p.error(f"no client index at {args.clients}")
    listener = listen(args.socket)
    # Started before torch and ESPnet are imported (numpy's BLAS threads exist already; the child
    # only calls prctl before exec). Same process group: a kill of the node's group takes both;
    # and the node dies with its trainer.
    node = subprocess.Popen(node_cmd, preexec_fn=die_with(os.getpid()) if sys.platform == "linux" else None)
    try:
        trainer = ResidentTrainer(args.clients)
        logger.info("resident trainer of %s (%d clients) on %s, pid %d", args.clients, len(trainer.clients), args.socket,
                    os.getpid())
        if node.poll() is None:  # a SuperNode that died already leaves no ready file: the launch fails
            ready_file(args.socket).touch()
        trainer.serve(listener, node)
    finally:
        listener.close()
        args.socket.unlink(missing_ok=True)
        ready_file(args.socket).unlink(missing_ok=True)
        if node.poll() is None:
            node.terminate()
    sys.exit(node.wait())


if __name__ == "__main__":
    main()
