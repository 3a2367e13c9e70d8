"""Wire data, model and federated server together: the Python API behind `fl_train`."""
from __future__ import annotations

import shlex
import shutil
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import yaml

from ..asr.model import build_asr_args, build_asr_model, save_espnet_config
from ..data.clients import load_clients
from ..data.held_out import split_held_out
from ..data.dataset import make_dataloader
from .config import FLConfig
from .distributed import Ranks, resolve_device
from .executor import BatchSpec
from .server import FederatedServer, RemoteClients

# Fixed, unlike dev_max_duration (which a resumed run may change): the batching of the
# held-out set changes its loss in the last bits, and with it rl_dga's choices.
HELD_OUT_MAX_DURATION = 120.0


def build_server(
    conf: FLConfig,
    *,
    asr_config: Path,
    train_clients: Optional[Path] = None,
    token_list: Path,
    bpemodel: Path,
    output_dir: Path,
    feats_stats: Optional[Path] = None,
    dev_cuts: Optional[Path] = None,
    seed: int = 0,
    num_threads: int = 1,
    client_jobs: int = 1,
    command: Optional[Sequence[str]] = None,
    ngpu: int = 0,
    ranks: Ranks = Ranks(),
    remote: Optional[RemoteClients] = None,
) -> FederatedServer:
    """The federated server of this experiment, resumed from `output_dir` if it holds one.

    `command`, the argv that runs this experiment, is saved as `fl_train.sh`. With
    `strategy.held_out_utts` (rl_dga), that many dev utterances become the server's
    held-out set (`held_out.jsonl.gz` in `output_dir`) and validation uses the rest.
    With `ngpu` 1 the model, the batches and the server step are on this rank's GPU.
    Under torchrun (`ranks`), only rank 0 writes to `output_dir`. With `remote` (a Flower
    federation) the clients are the nodes' and train there: `train_clients` is not read.
    """
    import torch

    device = resolve_device(ngpu, ranks.local_rank)
    if ngpu and client_jobs > 1:
        raise ValueError("--client_jobs > 1 trains clients in CPU worker processes; with --ngpu 1 run one process "
                         "per GPU with torchrun instead")
    output_dir = Path(output_dir)
    if ranks.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    # One intra-op thread by default: on a shared 2-core machine, 2 threads per
    # process were measured 10-50x slower under load than 1.
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    args = build_asr_args(asr_config, token_list, bpemodel, feats_stats)
    model = build_asr_model(args).to(device)
    batches = BatchSpec(bpemodel, token_list, conf.client.max_duration, conf.client.max_cuts, conf.client.audio_cache_mb)
    if (remote is None) == (train_clients is None):
        raise ValueError("give either train_clients (clients.jsonl) or a remote federation, not both")
    clients = load_clients(train_clients) if remote is None else remote.clients
    dev = held_out = None
    if conf.strategy.held_out_utts is not None and ranks.is_main:
        if dev_cuts is None:
            raise ValueError("strategy.held_out_utts carves the server's held-out set out of the dev set: give --dev_cuts")
        held_out_cuts, dev_cuts = split_held_out(dev_cuts, conf.strategy.held_out_utts, seed, output_dir)
        held_out = partial(make_dataloader, held_out_cuts, batches.tokenizer, max_duration=HELD_OUT_MAX_DURATION, shuffle=False)
    if dev_cuts is not None:
        dev = partial(make_dataloader, dev_cuts, batches.tokenizer, max_duration=conf.dev_max_duration, shuffle=False)
    server = FederatedServer(model, args, conf, clients, batches, dev, output_dir, seed, client_jobs, held_out, ranks, remote)
    server.maybe_resume()  # refuses another experiment's output_dir before anything there is rewritten
    if not ranks.is_main:
        return server

    save_espnet_config(args, output_dir / "config.yaml")
    with open(output_dir / "fl_config.yaml", "w") as f:
        yaml.safe_dump(conf.to_dict(), f, sort_keys=False)
    shutil.copyfile(asr_config, output_dir / "asr_config.yaml")
    if command is not None:
        (output_dir / "fl_train.sh").write_text(
            "#!/usr/bin/env bash\n# The command that ran (and resumes) this experiment.\n"
            + " ".join(shlex.quote(a) for a in command) + "\n"
        )
    return server


def train(conf: FLConfig, **kwargs) -> FederatedServer:
    """Run (or resume) federated training; returns the server with the final global model.

    Takes `build_server`'s arguments.
    """
    server = build_server(conf, **kwargs)
    server.fit()
    return server
