"""The Flower `ClientApp`: a SuperNode's clients train with fl_lib's own `LocalTrainer`.

A SuperNode is started with `--node-config 'clients="<node>/clients.jsonl"'`: the index of
the clients (speakers) it holds, and nothing else (in Flower's simulation engine, node i reads
node i's index). Two message types:

- `query`: the node's index (ids, sizes, manifest digests), from which the server learns
  which node holds which client, without reading any manifest itself;
- `train`: one client's local round, the same `LocalTrainer.train` the native loop calls,
  on a model built from the setup the server sent. The reply is the pseudo-gradient and
  the `ClientResult` statistics. A client the node does not hold is refused.

A deployed SuperNode runs each message in a fresh process, which would import ESPnet and build
the model for every message. The launcher therefore gives each SuperNode a resident trainer
(`node_trainer.py`, named by `trainer="<socket>"` in the node config) and this process hands it
the message; without one (the simulation engine, whose actors keep their imports), the model
is built here per message. Either way its weights come with the message.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..atomic import atomic_path
from ..data.clients import ClientInfo, load_clients
from ..data.markers import content_digest

app = ClientApp()


def node_clients(context: Context) -> tuple[Path, dict[str, ClientInfo]]:
    """This node's index file and its clients by id.

    A deployed SuperNode names its index in its node config; Flower's simulation engine
    numbers its nodes instead (`partition-id`), and node i reads `<nodes-dir>/node<i>/clients.jsonl`."""
    node = context.node_config
    if node.get("clients"):
        index = Path(str(node["clients"]))
    elif "partition-id" in node and context.run_config.get("nodes-dir"):
        nodes_dir = Path(str(context.run_config["nodes-dir"]))
        made = len(list(nodes_dir.glob("node*/clients.jsonl")))
        if made != int(node["num-partitions"]):
            raise ValueError(f"the simulation has {node['num-partitions']} SuperNodes, {nodes_dir} holds {made} node indexes")
        index = nodes_dir / f"node{int(node['partition-id'])}" / "clients.jsonl"
    else:
        raise ValueError("this SuperNode was started without its client index: --node-config 'clients=\"<path>/clients.jsonl\"'")
    return index, {c.id: c for c in load_clients(index)}


def index_record(clients: dict[str, ClientInfo]) -> ConfigRecord:
    # A missing manifest is a client that fails each round it is sampled, as natively, not a node that cannot list.
    rows = [{"id": c.id, "num_cuts": c.num_cuts, "duration": c.duration,
             "digest": content_digest(c.manifest) if c.manifest.exists() else None} for c in clients.values()]
    return ConfigRecord({"clients": json.dumps(rows)})


@app.query()
def query(msg: Message, context: Context) -> Message:
    _, clients = node_clients(context)
    return Message(RecordDict({"index": index_record(clients)}), reply_to=msg)


def setup_files(setup, cache: Path) -> dict[str, Path]:
    """The setup's files written once under `cache`, named by their content. Two ClientApps of one
    node may write the same file at once (the simulation engine's actors): each process writes its
    own temporary file and renames it, so a reader never sees half a file."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in setup.files.items():
        path = cache / f"{hashlib.sha256(data).hexdigest()[:16]}.{name}"
        if not path.exists():
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
        paths[name] = path
    return paths


def build_trainer(setup, cache: Path):
    """The `LocalTrainer` the server's native loop would use (`espnet_trainer`, at the server's
    thread count), with the node's copies of the files."""
    from ..espnet_env import asr_task
    from ..fl.config import ClientConfig, from_dict
    from ..fl.executor import BatchSpec, espnet_trainer

    files = setup_files(setup, cache)
    args = asr_task().get_parser().parse_args([])
    for key, value in setup.espnet_config.items():
        setattr(args, key, value)
    args.bpemodel = str(files["bpemodel"])
    args.init_param = []  # the start weights come with every task
    if "feats_stats" in files:
        args.normalize_conf = {**(args.normalize_conf or {}), "stats_file": str(files["feats_stats"])}
    batches = BatchSpec(files["bpemodel"], files["token_list"], **setup.batches)
    return espnet_trainer(args, from_dict(ClientConfig, setup.client), batches, setup.seed, setup.num_threads)


def train_reply(content: RecordDict, index: Path, clients: dict[str, ClientInfo], trainers: Optional[dict] = None) -> RecordDict:
    """One client's local round from a train message's content, as the reply's content.

    `trainers` (setup key -> LocalTrainer) keeps the trainer for the next task, as a native
    worker keeps its own; without it the trainer is built for this task alone."""
    from .records import read_task, result_content  # torch: not for a query, which runs in a process of its own

    task = read_task(content)
    if task.client_id not in clients:
        raise ValueError(f"client {task.client_id} is not held by this node ({index}): the server sent it to the wrong node")
    key = task.setup.key()
    trainer = trainers.get(key) if trainers is not None else None
    if trainer is None:
        trainer = build_trainer(task.setup, index.parent / "setup")
        if trainers is not None:
            trainers.clear()  # one experiment's setup at a time
            trainers[key] = trainer
    result = trainer.train(task.client_id, clients[task.client_id].manifest, task.start, task.draw, task.proximal_mu,
                           task.lr_scale)
    return result_content(result)


@app.train()
def train(msg: Message, context: Context) -> Message:
    resident = context.node_config.get("trainer")
    if resident:  # the node's resident trainer (node_trainer.py) trains: this process never imports torch
        from .node_trainer import request

        # No longer than the message lives: after its TTL (the server's round timeout) no one waits for the reply.
        # The clocks of the server and the node must agree, as Flower's own reply TTL already assumes
        # (Message(reply_to=...) subtracts the instruction's created_at from this process's clock).
        left = msg.metadata.created_at + msg.metadata.ttl - time.time()
        return Message(request(Path(str(resident)), msg.content, timeout=max(left, 1.0)), reply_to=msg)
    index, clients = node_clients(context)
    return Message(train_reply(msg.content, index, clients), reply_to=msg)
