"""`flower-supernode` with a short poll, for deployments on one machine.

flwr's SuperNode (1.42, `flwr/supernode/start_client_internal.py`) sleeps 3 s whenever a pull
finds no message, and checks every 0.5 s whether its ClientApp's reply is ready. Between rounds
every node is idle, so each round waits on average 1.5 s before its train message is even
pulled: on the demo's rounds of a few seconds that is a large part of flower-grpc's overhead.
This runs the stock SuperNode with every one of those sleeps capped at `--poll` seconds;
nothing else in the node's process changes.

    python -m fl_lib.flower.supernode --poll 0.05 --insecure --superlink 127.0.0.1:9092 ...

The SuperExec that launches each message's ClientApp polls for tasks every second; that one
has Flower's own setting, FLWR_SUPEREXEC_TASK_POLL_INTERVAL, which `LocalDeployment` sets in the
SuperNodes' environment only. Every idle node then pulls from the SuperLink, and its SuperExec asks
for a task, 1/poll times a second: CPU taken from training, not measured yet.
"""
from __future__ import annotations

import argparse
import sys
import time
import types
from typing import Sequence

import flwr
from flwr.supernode import start_client_internal

FLWR_VERSION = "1.42.0"  # the SuperNode whose sleeps were read; another one is refused


def cap_sleeps(poll: float) -> None:
    """Make the SuperNode loop's `time.sleep(s)` sleep min(s, poll); every other use of `time` is untouched."""
    if flwr.__version__ != FLWR_VERSION:
        raise RuntimeError(f"fl_lib.flower.supernode caps the sleeps of flwr {FLWR_VERSION}'s SuperNode, this is flwr "
                           f"{flwr.__version__}: read its start_client_internal.py again, or run with --node_poll flower")
    if start_client_internal.time is not time:
        raise RuntimeError("flwr.supernode.start_client_internal.time is not the time module: capped twice?")
    shim = types.ModuleType("time")
    shim.__dict__.update({k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    shim.sleep = lambda seconds: time.sleep(min(seconds, poll))
    start_client_internal.time = shim


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--poll", type=float, required=True, help="the longest sleep of the SuperNode's loop, in seconds")
    args, supernode_args = p.parse_known_args(sys.argv[1:] if argv is None else argv)  # the rest is flower-supernode's
    if not args.poll > 0:
        p.error(f"--poll must be > 0, got {args.poll}")
    cap_sleeps(args.poll)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *supernode_args]
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
