"""Federated-loop overhead: K clients x S local steps vs. plain ESPnet over the same batches.

Federated: a real `FederatedServer.fit()` of one round (dev disabled) with the real
`LocalTrainer` on a tiny synthesized corpus (stages 0-4 through the library), the
recipe's small RNN model and the recipe's FL config, overridden to K clients per
round, S local steps (`client.max_steps`) and batches of --max_duration seconds.
Everything a round costs is timed: per-client state loads, optimizer and dataloader
construction, ESPnet's `train_one_epoch`, pseudo-gradients, aggregation, the
server step, metrics, TensorBoard and the checkpoint writes.

Plain: the same model from the same start weights, the same client optimizer
settings and ESPnet `Trainer.train_one_epoch` options, one continuous pass over
one DataLoader that yields exactly the K*S batches the clients trained on
(same cuts, same order, audio loaded the same way).

Runs alternate (fed, plain, plain, fed, ...) --repeats times; the reported ratio
is the median of the per-repeat ratios federated/plain. A timing breakdown of
the federated round (medians, seconds) comes along in the same JSON line.

    .venv/bin/python bench/fl_overhead.py                      # K=4, S=5, 15 s batches
    .venv/bin/python bench/fl_overhead.py --k 8 --steps 10 --speakers 8 --work_dir /tmp/flb
    .venv/bin/python bench/fl_overhead.py --profile /tmp/fed.prof   # + cProfile of one federated round

Target: ratio <= 1.15.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Timers  # noqa: E402


class TimedTrainer:
    """ESPnet's Trainer with `train_one_epoch` timed and its batch fetches timed apart."""

    def __init__(self, trainer, timers: Timers) -> None:
        self.trainer = trainer
        self.timers = timers

    def train_one_epoch(self, *, iterator, **kw):
        with self.timers("train_one_epoch"):
            return self.trainer.train_one_epoch(iterator=self.timers.iterate("batch_fetch", iterator), **kw)


def setup(opts):
    import torch

    from fl_lib.asr.model import build_asr_args, build_asr_model
    from fl_lib.data.clients import load_clients
    from fl_lib.data.tokenizer import Tokenizer
    from fl_lib.fl.config import FLConfig

    data = common.tiny_data(Path(opts.work_dir), opts.utts_per_client, opts.speakers, opts.asr_config)
    asr_config = data["asr_config"]
    args = build_asr_args(asr_config, data["token_list"], data["bpemodel"], data["feats_stats"])
    torch.manual_seed(opts.seed)
    model = build_asr_model(args)
    tokenizer = Tokenizer(data["bpemodel"], data["token_list"])
    clients = load_clients(data["clients"])
    if opts.k > len(clients):
        raise SystemExit(f"--k {opts.k} but the corpus has {len(clients)} clients; raise --speakers")
    conf = FLConfig.from_yaml(
        common.CONF_DIR / opts.fl_config,
        [
            "rounds=1",
            f"clients_per_round={opts.k}",
            f"client.max_steps={opts.steps}",
            f"client.max_duration={opts.max_duration}",
            f"client.local_epochs={opts.local_epochs}",
        ],
    )
    return data, args, model, tokenizer, clients, conf


def make_batches_fn(data: dict, conf):
    """What the server gets to batch a client's data, as `fl_lib.fl.train` builds it."""
    from fl_lib.fl.executor import BatchSpec

    return BatchSpec(data["bpemodel"], data["token_list"], conf.client.max_duration, conf.client.max_cuts)


def local_trainer(server):
    """The server's in-process LocalTrainer (serial clients)."""
    return server.clients_executor.trainer


def build_server(model, args, conf, clients, make_batches, out_dir, seed, timers: Timers):
    """A real FederatedServer with timers around the parts of a round (behaviour unchanged)."""
    from fl_lib.fl.server import FederatedServer

    server = FederatedServer(model, args, conf, clients, make_batches, None, out_dir, seed)
    local = local_trainer(server)
    local.make_batches = timers.wrap("dataloader_construct", make_batches)
    local.trainer = TimedTrainer(local.trainer, timers)
    server.run_round = timers.wrap("run_round", server.run_round)
    server._server_step = timers.wrap("server_step", server._server_step)
    server._record = timers.wrap("record(metrics+tb+checkpoints)", server._record)
    server._tensorboard = timers.wrap("tensorboard", server._tensorboard)
    server.strategy.add = timers.wrap("strategy_add", server.strategy.add)
    server.strategy.aggregate = timers.wrap("strategy_aggregate", server.strategy.aggregate)
    local.train = timers.wrap("client_train_total", local.train)
    return server


@contextlib.contextmanager
def patched_client_module(timers: Timers, model):
    """Time the module-level helpers LocalTrainer.train calls, and the model's state loads."""
    import fl_lib.fl.client as client_mod

    saved = client_mod.pseudo_gradient, client_mod.build_client_optimizer
    client_mod.pseudo_gradient = timers.wrap("pseudo_gradient", saved[0])
    client_mod.build_client_optimizer = timers.wrap("client_optimizer_build", saved[1])
    model.load_state_dict = timers.wrap("model_load_state_dict", type(model).load_state_dict.__get__(model))
    try:
        yield
    finally:
        client_mod.pseudo_gradient, client_mod.build_client_optimizer = saved
        del model.load_state_dict


def batch_plan(server, round_idx: int = 0) -> list[list[str]]:
    """The utterance ids of every batch the round's clients train on, in training order."""
    plan = []
    for cid in server.sampler.sample(round_idx):
        for utt_ids, _ in local_trainer(server)._batches(server.clients[cid].manifest, round_idx, cid):
            plan.append(list(utt_ids))
    return plan


def run_federated(opts, args, model, tokenizer, clients, conf, init, out_root: Path, index: int, profile=None):
    timers = Timers()
    model.load_state_dict(init)
    out_dir = out_root / f"fed{index}"
    with patched_client_module(timers, model):
        server = build_server(model, args, conf, clients, opts.make_batches, out_dir, opts.seed, timers)
        t0 = time.perf_counter()
        if profile is not None:
            profile.enable()
        server.fit()
        if profile is not None:
            profile.disable()
        total = time.perf_counter() - t0
    return total, dict(timers.seconds), timers.steps


def run_plain(opts, args, model, tokenizer, conf, init, plan, options):
    """ESPnet's train_one_epoch over one DataLoader yielding the planned batches."""
    import torch
    from espnet2.train.distributed_utils import DistributedOption
    from espnet2.train.reporter import Reporter
    from espnet2.train.trainer import Trainer
    from lhotse import CutSet

    from fl_lib.data.dataset import AsrBatchDataset
    from fl_lib.fl.client import build_client_optimizer

    timers = Timers()
    model.load_state_dict(init)
    torch.manual_seed(opts.seed)
    t0 = time.perf_counter()
    sampler = [CutSet.from_cuts(opts.cuts_by_id[u] for u in ids) for ids in plan]
    loader = torch.utils.data.DataLoader(AsrBatchDataset(tokenizer), sampler=sampler, batch_size=None)
    optimizer = build_client_optimizer(model.parameters(), conf.client)
    reporter = Reporter()
    with reporter.observe("train", 1) as sub:
        TimedTrainer(Trainer, timers).train_one_epoch(
            model=model, iterator=loader, optimizers=[optimizer], schedulers=[None], scaler=None, reporter=sub,
            summary_writer=None, options=options, distributed_option=DistributedOption(distributed=False),
        )
    return time.perf_counter() - t0, dict(timers.seconds), timers.steps


def main() -> None:
    # ESPnet prints to stdout at import; keep stdout for the one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        record = measure()
    common.emit(record)


def measure() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=4, help="clients per round")
    p.add_argument("--steps", type=int, default=5, help="local steps per client (client.max_steps)")
    p.add_argument("--max_duration", type=float, default=15.0, help="seconds of audio per batch")
    p.add_argument("--local_epochs", type=int, default=100, help="upper bound; --steps stops each client first")
    p.add_argument("--repeats", type=int, default=3, help="federated/plain pairs, alternated")
    p.add_argument("--utts_per_client", type=int, default=30, help="training utterances per synthesized speaker")
    p.add_argument("--speakers", type=int, default=None, help="training speakers (clients) to synthesize (default 4)")
    p.add_argument("--fl_config", default="fl_fedavg.yaml", help="recipe FL config under egs/librispeech_fl/conf")
    p.add_argument("--asr_config", default=None, help="ESPnet ASR yaml (default: the recipe's train_asr_rnn_small.yaml)")
    p.add_argument("--work_dir", default=None, help="where the tiny corpus is built and cached (default: a temp dir)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--profile", default=None, help="write a cProfile of one extra federated round to this file")
    opts = p.parse_args()

    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)  # ESPnet warns once per forward (make_pad_mask)
    with tempfile.TemporaryDirectory(prefix="fl_overhead_") as tmp:
        tmp = Path(tmp)
        if opts.work_dir is None:
            opts.work_dir = str(tmp / "data")
        data, args, model, tokenizer, clients, conf = setup(opts)
        opts.make_batches = make_batches_fn(data, conf)
        from lhotse import load_manifest

        opts.cuts_by_id = {cut.id: cut for c in clients for cut in load_manifest(c.manifest)}
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}

        # The plan (batches per client) and the ESPnet options the clients use.
        probe = build_server(model, args, conf, clients, opts.make_batches, tmp / "probe", opts.seed, Timers())
        plan = batch_plan(probe)
        options = local_trainer(probe).options
        del probe
        steps = len(plan)
        if steps != opts.k * opts.steps:
            print(f"warning: {steps} batches planned, expected K*S={opts.k * opts.steps}", file=sys.stderr)
        audio_s = sum(opts.cuts_by_id[u].duration for ids in plan for u in ids)

        # Warm-up: one of each (first-touch allocations, lazy imports, TensorBoard import).
        run_federated(opts, args, model, tokenizer, clients, conf, init, tmp, -1)
        run_plain(opts, args, model, tokenizer, conf, init, plan, options)

        fed_t, plain_t, ratios, parts = [], [], [], defaultdict(list)
        first = [i * opts.steps for i in range(opts.k)]  # each client's first step in the plan
        step_ratio_first, step_ratio_rest = [], []
        for r in range(opts.repeats):
            order = ("fed", "plain") if r % 2 == 0 else ("plain", "fed")
            got = {}
            for what in order:
                if what == "fed":
                    t, timers, step_s = run_federated(opts, args, model, tokenizer, clients, conf, init, tmp, r)
                    for key, v in timers.items():
                        parts[key].append(v)
                else:
                    t, timers, step_s = run_plain(opts, args, model, tokenizer, conf, init, plan, options)
                    for key, v in timers.items():
                        parts["plain." + key].append(v)
                got[what] = t
                got[what + "_steps"] = step_s
            if len(got["fed_steps"]) == len(got["plain_steps"]) == steps == opts.k * opts.steps:
                pairs = [f / p for f, p in zip(got["fed_steps"], got["plain_steps"])]
                step_ratio_first.append(statistics.median(pairs[i] for i in first))
                step_ratio_rest.append(statistics.median(x for i, x in enumerate(pairs) if i not in first))
            fed_t.append(got["fed"])
            plain_t.append(got["plain"])
            ratios.append(got["fed"] / got["plain"])

        if opts.profile:
            import cProfile

            prof = cProfile.Profile()
            run_federated(opts, args, model, tokenizer, clients, conf, init, tmp, 999, profile=prof)
            prof.dump_stats(opts.profile)

    med = {k: round(statistics.median(v), 4) for k, v in sorted(parts.items())}
    fed_med, plain_med = statistics.median(fed_t), statistics.median(plain_t)
    return (
        {
            "k": opts.k,
            "s": opts.steps,
            "batches": steps,
            "audio_s": round(audio_s, 1),
            "max_duration": opts.max_duration,
            "federated_s": round(fed_med, 3),
            "plain_s": round(plain_med, 3),
            "ratio": round(statistics.median(ratios), 4),
            "ratios": [round(x, 4) for x in ratios],
            "federated_s_all": [round(x, 3) for x in fed_t],
            "plain_s_all": [round(x, 3) for x in plain_t],
            "fit_outside_run_round_s": round(fed_med - med.get("run_round", 0) - med.get("record(metrics+tb+checkpoints)", 0), 4),
            "step_ratio_first_of_client": round(statistics.median(step_ratio_first), 4) if step_ratio_first else None,
            "step_ratio_other": round(statistics.median(step_ratio_rest), 4) if step_ratio_rest else None,
            "breakdown_s": med,
            "fl_config": opts.fl_config,
            "target_ratio": 1.15,
        }
    )


if __name__ == "__main__":
    main()
