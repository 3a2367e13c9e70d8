"""The SuperNodes' clients as the federated server sees them: who holds which client, and an
executor that sends a round's tasks to their holders.

The server learns the federation by asking every node for its index (`discover`), so it
never opens a manifest. `FlowerClients` is the server's executor (`fl_lib.fl.executor`):
one train message per sampled client, outcomes yielded in sampling order as soon as they are
available, so streaming aggregation adds the same numbers in the same order as natively.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..data.clients import ClientInfo
from ..fl.executor import BatchSpec, Outcome, Task
from .records import ClientSetup, MalformedUpdate, read_result, task_content

logger = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """The nodes do not form the federation the run needs."""


def client_setup(args: argparse.Namespace, client_conf, batches: BatchSpec, seed: int, num_threads: int) -> ClientSetup:
    """What a node needs to build the server's `LocalTrainer`, files included."""
    from ..asr.model import espnet_config

    files = {"bpemodel": Path(batches.bpemodel).read_bytes(), "token_list": Path(batches.token_list).read_bytes()}
    if args.normalize == "global_mvn":
        files["feats_stats"] = Path(args.normalize_conf["stats_file"]).read_bytes()
    return ClientSetup(
        espnet_config=json.loads(json.dumps(espnet_config(args))), client=dataclasses.asdict(client_conf),
        batches={"max_duration": batches.max_duration, "max_cuts": batches.max_cuts, "audio_cache_mb": batches.audio_cache_mb},
        files=files, seed=seed, num_threads=num_threads,
    )


@dataclass
class FlowerFederation:
    """The clients the SuperNodes hold (`RemoteClients` of the federated server)."""

    grid: Grid
    node_of: dict  # client id -> node id
    clients: list  # ClientInfo; `manifest` only names the holder ("node<id>:<client id>"): the file stays there
    digests: dict  # client id -> manifest digest, computed by its node (None: the node lacks the file)
    round_timeout: float
    poll_seconds: float = 0.2
    bytes_per_draw: dict = field(default_factory=dict)  # draw -> bytes of the ArrayRecords sent and received

    def executor(self, espnet_args, client_conf, batches: BatchSpec, seed: int, num_threads: int,
                 trained: Sequence[str]) -> "FlowerClients":
        return FlowerClients(self, client_setup(espnet_args, client_conf, batches, seed, num_threads), trained)


def discover(grid: Grid, min_nodes: int, timeout: float, round_timeout: float, poll_seconds: float = 0.5) -> FlowerFederation:
    """Ask every connected node for its client index; each client must be held by exactly one node."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise FederationError(f"{len(nodes)} SuperNodes connected within {timeout:.0f} s, the run needs {min_nodes}")
        time.sleep(poll_seconds)
    msgs = [Message(RecordDict({"request": ConfigRecord({"what": "index"})}), dst_node_id=n, message_type=MessageType.QUERY,
                    ttl=timeout) for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    node_of, clients, digests = {}, [], {}
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise FederationError(f"SuperNode {node} could not list its clients: {reply.error.reason}")
        for row in json.loads(reply.content.config_records["index"]["clients"]):
            if row["id"] in node_of:
                raise FederationError(f"client {row['id']} is held by SuperNodes {node_of[row['id']]} and {node}: "
                                      "give each node its own clients")
            node_of[row["id"]] = node
            clients.append(ClientInfo(row["id"], int(row["num_cuts"]), float(row["duration"]), Path(f"node{node}:{row['id']}")))
            digests[row["id"]] = row["digest"]
    if len(replies) < len(nodes):
        raise FederationError(f"{len(nodes) - len(replies)} of {len(nodes)} SuperNodes did not list their clients within {timeout:.0f} s")
    clients.sort(key=lambda c: c.id)
    logger.info(f"federation: {len(clients)} clients on {len(nodes)} SuperNodes")
    return FlowerFederation(grid, node_of, clients, digests, round_timeout)


class FlowerClients:
    """The federated server's executor over Flower: one train message per sampled client.

    A client whose node is not connected, whose message the SuperLink did not take, whose
    node returns an error (the ClientApp raised; the SuperLink declared the node
    unavailable), whose reply does not come within `round_timeout`, or whose reply is
    malformed, becomes a failed outcome with the reason: the server's
    `min_clients_per_round` and `max_client_failures` rules take it from there. A message
    lives no longer than the round waits for it, so a late node does not train stale tasks.
    """

    def __init__(self, federation: FlowerFederation, setup: ClientSetup, trained: Sequence[str]) -> None:
        self.fed = federation
        self.setup = setup
        self.trained = list(trained)  # the entries a reply's Δ must have (client.trained_entries), no more

    def _failed(self, cid: str, reason: str) -> Outcome:
        return Outcome(cid, None, reason)

    def map(self, tasks: Iterable[Task]) -> Iterator[Outcome]:
        fed = self.fed
        tasks = list(tasks)
        online = set(fed.grid.get_node_ids())
        early: dict[str, Outcome] = {}  # client id -> a failure known before any reply
        msgs = {}
        for task in tasks:
            node = fed.node_of[task.client_id]
            if node not in online:
                early[task.client_id] = self._failed(task.client_id, f"SuperNode {node} holding client {task.client_id} is not connected")
                continue
            msgs[task.client_id] = Message(task_content(task, self.setup), dst_node_id=node, message_type=MessageType.TRAIN,
                                           group_id=str(task.round_idx), ttl=fed.round_timeout)
        ids = list(fed.grid.push_messages(list(msgs.values()))) if msgs else []
        pending = {}  # message id -> client id
        for (cid, msg), mid in zip(msgs.items(), ids + [None] * (len(msgs) - len(ids))):
            if mid:
                pending[mid] = cid
            else:
                early[cid] = self._failed(cid, f"the SuperLink did not take the train message for client {cid}")
        draw = tasks[0].round_idx if tasks else None
        sent = sum(m.content.array_records["arrays"].count_bytes() for cid, m in msgs.items() if cid not in early)
        del msgs
        replies: dict[str, Message] = {}
        received = 0
        deadline = time.monotonic() + fed.round_timeout
        for task in tasks:
            cid = task.client_id
            while cid not in early and cid not in replies:
                if time.monotonic() > deadline:
                    for other in pending.values():
                        early[other] = self._failed(other, f"no reply from SuperNode {fed.node_of[other]} within the "
                                                           f"round timeout of {fed.round_timeout:.0f} s")
                    pending.clear()
                    break
                got = list(fed.grid.pull_messages(list(pending)))
                for reply in got:
                    other = pending.pop(reply.metadata.reply_to_message_id, None)
                    if other is not None:
                        replies[other] = reply
                if not got:
                    time.sleep(fed.poll_seconds)
            if cid in early:
                yield early.pop(cid)
                continue
            reply = replies.pop(cid)
            if reply.has_error():
                yield self._failed(cid, f"SuperNode {fed.node_of[cid]}: {reply.error.reason}")
                continue
            received += sum(r.count_bytes() for r in reply.content.array_records.values())
            try:
                expected = {k: task.start[k] for k in self.trained}
                yield Outcome(cid, read_result(reply.content, cid, expected), None, f"node={reply.metadata.src_node_id}")
            except MalformedUpdate as e:
                yield self._failed(cid, f"update rejected: {e}")
        if draw is not None:
            fed.bytes_per_draw[draw] = {"sent": sent, "received": received}

    def close(self) -> None:
        pass
