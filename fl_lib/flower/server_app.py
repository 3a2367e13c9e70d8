"""The Flower `ServerApp`: fl_lib's own federated server, with its clients on SuperNodes.

The round loop, sampling, strategies (FedAvg, DGA, BMUF, RL-DGA, the robust rules), server
optimizer, LR schedules, DP, checkpoints, `metrics.jsonl`, TensorBoard and resume are
`fl_lib.fl.server.FederatedServer`'s, unchanged. Flower replaces only the executor: a round's
tasks go to the nodes holding the sampled clients as train messages, and the replies come
back in sampling order, so streaming aggregation adds the same numbers in the same order as
the native loop. The round counter, server optimizer and strategy state live in fl_lib's
checkpoint, so a restarted ServerApp continues where it stopped instead of at Flower's round 1.

Run configuration (`[tool.flwr.app.config]`, written by `fl_lib.bin.flower_train`): the
`fl_train` options, with `-` for `_`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..data.clients import ClientInfo
from ..fl.executor import BatchSpec, Outcome, Task
from .records import ClientSetup, MalformedUpdate, read_result, task_content

logger = logging.getLogger(__name__)
app = ServerApp()
STATUS = "flower_status.json"  # written last by the ServerApp: how the run ended, for the launcher


class FederationError(RuntimeError):
    """The nodes do not form the federation the run needs."""


def client_setup(args: argparse.Namespace, client_conf, batches: BatchSpec, seed: int, num_threads: int) -> ClientSetup:
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
    clients: list  # ClientInfo, manifest paths as the nodes hold them
    digests: dict  # client id -> manifest digest, computed by its node
    round_timeout: float
    poll_seconds: float = 0.2
    sent_bytes: list = field(default_factory=list)  # per round: bytes of the train messages and of their replies

    def executor(self, espnet_args, client_conf, batches: BatchSpec, seed: int, num_threads: int) -> "FlowerClients":
        return FlowerClients(self, client_setup(espnet_args, client_conf, batches, seed, num_threads))


def discover(grid: Grid, min_nodes: int, timeout: float, poll_seconds: float = 0.5) -> FlowerFederation:
    """Ask every connected node for its client index; each client must be held by exactly one node."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise FederationError(f"{len(nodes)} SuperNodes connected within {timeout:.0f} s, the run needs {min_nodes}")
        time.sleep(poll_seconds)
    msgs = [Message(RecordDict({"request": ConfigRecord({"what": "index"})}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in nodes]
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
    return FlowerFederation(grid, node_of, clients, digests, round_timeout=timeout)


class FlowerClients:
    """The federated server's executor over Flower: one train message per sampled client.

    Outcomes are yielded in sampling order as soon as they are available. A client whose
    node is not connected, whose node returns an error (the ClientApp raised, or the
    SuperLink declared the node unavailable), whose reply does not come within
    `round_timeout`, or whose reply is malformed, becomes a failed outcome with the reason:
    the server's `min_clients_per_round` and `max_client_failures` rules take it from there.
    """

    def __init__(self, federation: FlowerFederation, setup: ClientSetup) -> None:
        self.fed = federation
        self.setup = setup

    def map(self, tasks: Iterable[Task]) -> Iterator[Outcome]:
        fed = self.fed
        tasks = list(tasks)
        online = set(fed.grid.get_node_ids())
        early: dict[str, Outcome] = {}
        msgs = []
        for task in tasks:
            node = fed.node_of[task.client_id]
            if node not in online:
                early[task.client_id] = Outcome(task.client_id, None, f"SuperNode {node} holding client {task.client_id} is not connected")
                continue
            msgs.append(Message(task_content(task, self.setup), dst_node_id=node, message_type=MessageType.TRAIN,
                                group_id=str(task.round_idx)))
        sent = sum(m.content.array_records["arrays"].count_bytes() for m in msgs)
        ids = list(fed.grid.push_messages(msgs))
        pending = {mid: m.content.config_records["task"]["client-id"] for mid, m in zip(ids, msgs)}
        del msgs
        replies: dict[str, Message] = {}
        received = 0
        deadline = time.monotonic() + fed.round_timeout
        for task in tasks:
            cid = task.client_id
            while cid not in early and cid not in replies:
                if time.monotonic() > deadline:
                    for mid, other in pending.items():
                        early[other] = Outcome(other, None, f"no reply from SuperNode {fed.node_of[other]} within the "
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
                yield Outcome(cid, None, f"SuperNode {fed.node_of[cid]}: {reply.error.reason}")
                continue
            received += sum(r.count_bytes() for r in reply.content.array_records.values())
            try:
                yield Outcome(cid, read_result(reply.content, cid, task.start), None, reply.metadata.src_node_id)
            except MalformedUpdate as e:
                yield Outcome(cid, None, f"update rejected: {e}")
        fed.sent_bytes.append({"sent": sent, "received": received})

    def close(self) -> None:
        pass


def run_args(context: Context) -> argparse.Namespace:
    """The run configuration as `fl_train` options."""
    cfg = {k.replace("-", "_"): v for k, v in context.run_config.items()}
    for key in ("feats_stats", "dev_cuts"):
        cfg[key] = Path(cfg[key]) if cfg.get(key) else None
    for key in ("asr_config", "fl_config", "token_list", "bpemodel", "output_dir"):
        cfg[key] = Path(cfg[key])
    cfg["overrides"] = shlex.split(cfg.get("overrides", ""))
    return argparse.Namespace(**cfg)


@app.main()
def main(grid: Grid, context: Context) -> None:
    from ..fl.config import FLConfig
    from ..fl.train import build_server
    from ..log import setup_logging

    a = run_args(context)
    a.output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request to the SuperLink otherwise
    handler = logging.FileHandler(a.output_dir / "flower_server.log")
    handler.setFormatter(logging.Formatter("%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    status = {"status": "failed"}
    try:
        conf = FLConfig.from_yaml(a.fl_config, a.overrides)
        federation = discover(grid, int(a.min_nodes), float(a.round_timeout))
        server = build_server(conf, asr_config=a.asr_config, token_list=a.token_list, bpemodel=a.bpemodel,
                              feats_stats=a.feats_stats, dev_cuts=a.dev_cuts, output_dir=a.output_dir, seed=int(a.seed),
                              num_threads=int(a.num_threads), remote=federation)
        server.fit()
        status = {"status": "finished", "rounds": server.round, "bytes_per_round": federation.sent_bytes}
    except Exception as e:
        logger.exception("the Flower ServerApp failed")
        status["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        (a.output_dir / STATUS).write_text(json.dumps(status, indent=1) + "\n")
        logging.getLogger().removeHandler(handler)
