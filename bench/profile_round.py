"""Where a federated round's time goes, on the recipe's own data (stages 0-4 must have run).

Runs `--rounds` real rounds of `FederatedServer` with in-process clients (one torch
thread, as each `--client_jobs` worker has) and times, by hooks and wrappers:

- `data`: fetching a batch (tokenization, padding, cache lookups), apart from
  `audio_load`, the time in `load_speech` (FLAC decoding of cuts not cached yet);
- `frontend` (STFT + fbank), `encoder_fwd`, `decoder_fwd`, `ctc_fwd`: forward hooks on
  the ESPnet model's modules (normalization and SpecAugment fall under `other`);
- `backward`: `Tensor.backward` (all modules together), and `optimizer`: the client steps;
- `state_transfer`: pickling and unpickling the start weights and one Δ, what moving a
  client's state to and from a worker process costs per client;
- `validation` and `checkpoint` (the server's per-round record: metrics, checkpoints).

Prints one JSON line: seconds per part, summed over the rounds, and their shares.

    .venv/bin/python bench/profile_round.py --asr_config egs/librispeech_fl/conf/train_asr_rnn_small.yaml
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RECIPE = common.REPO / "egs/librispeech_fl"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--asr_config", type=Path, default=RECIPE / "conf/train_asr_rnn_small.yaml")
    p.add_argument("--fl_config", type=Path, default=RECIPE / "conf/fl_dga_sgd.yaml")
    p.add_argument("--data", type=Path, default=RECIPE / "data", help="the recipe's data/ (stages 0-4)")
    p.add_argument("--feats_stats", type=Path, default=RECIPE / "exp/asr_stats/feats_stats.npz")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the federated config")
    return p


def torch_grad_enabled() -> bool:
    import torch

    return torch.is_grad_enabled()


def _hook_forward(timers, module, label: str) -> None:
    """Time the module's training forwards (validation is timed as a whole)."""
    if module is None:
        return
    starts = []
    module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))

    def post(*_):
        elapsed = time.perf_counter() - starts.pop()
        if torch_grad_enabled():
            timers.seconds[label] += elapsed

    module.register_forward_hook(post)


@contextlib.contextmanager
def _patched(timers, server):
    """Time data fetches, audio decoding, backward passes, optimizer steps, validation and records."""
    import torch

    import fl_lib.data.dataset as dataset_mod
    import fl_lib.fl.client as client_mod
    import fl_lib.fl.server as server_mod

    saved_load, saved_backward = dataset_mod.load_speech, torch.Tensor.backward
    saved_build, saved_eval = client_mod.build_client_optimizer, server_mod.evaluate
    dataset_mod.load_speech = timers.wrap("audio_load", saved_load)
    torch.Tensor.backward = timers.wrap("backward", saved_backward)

    def build_optimizer(*a, **kw):
        opt = saved_build(*a, **kw)
        # A bound method, as torch's LR schedulers (the client warmup) wrap `step` through `__func__`.
        opt.step = types.MethodType(timers.wrap("optimizer", lambda _self, *b, _step=opt.step, **k: _step(*b, **k)), opt)
        return opt

    client_mod.build_client_optimizer = build_optimizer
    server_mod.evaluate = timers.wrap("validation", saved_eval)
    server._record = timers.wrap("checkpoint", server._record)
    trainer = server.clients_executor.trainer
    make_batches = trainer.make_batches
    trainer.make_batches = lambda *a: timers.iterate("data", make_batches(*a))
    try:
        yield
    finally:
        dataset_mod.load_speech, torch.Tensor.backward = saved_load, saved_backward
        client_mod.build_client_optimizer, server_mod.evaluate = saved_build, saved_eval


def state_transfer_seconds(state) -> float:
    """Pickle + unpickle the start weights and one Δ of the same size: one client's round trip."""
    t0 = time.perf_counter()
    for _ in range(2):
        pickle.loads(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
    return time.perf_counter() - t0


def main() -> None:
    opts = get_parser().parse_args()
    import torch

    from fl_lib.fl.config import FLConfig
    from fl_lib.fl.train import build_server

    torch.set_num_threads(1)
    conf = FLConfig.from_yaml(opts.fl_config, [f"rounds={opts.rounds}", "keep_checkpoints=1", *opts.overrides])
    timers = common.Timers()
    with tempfile.TemporaryDirectory() as tmp:
        server = build_server(
            conf, asr_config=opts.asr_config, train_clients=opts.data / "clients/train-clean-100/clients.jsonl",
            token_list=opts.data / "token_list/char/tokens.txt", bpemodel=opts.data / "token_list/char/bpe.model",
            feats_stats=opts.feats_stats, dev_cuts=opts.data / "sets/dev-clean.jsonl.gz",
            output_dir=Path(tmp), seed=opts.seed, client_jobs=1,
        )
        model = server.model
        for label, module in [("frontend", model.frontend), ("encoder_fwd", model.encoder),
                              ("decoder_fwd", model.decoder), ("ctc_fwd", model.ctc)]:
            _hook_forward(timers, module, label)
        t0 = time.perf_counter()
        with _patched(timers, server):
            server.fit()
        total = time.perf_counter() - t0
    sec = dict(timers.seconds)
    clients = sum(len(server.sampler.sample(r)) for r in range(opts.rounds))
    sec["state_transfer"] = state_transfer_seconds(server.global_state) * clients
    parts = {
        "data": sec.get("data", 0.0) - sec.get("audio_load", 0.0),
        "audio_load": sec.get("audio_load", 0.0),
        **{k: sec.get(k, 0.0) for k in ("frontend", "encoder_fwd", "decoder_fwd", "ctc_fwd")},
        "backward": sec.get("backward", 0.0),
        "optimizer": sec.get("optimizer", 0.0),
        "state_transfer": sec["state_transfer"],
        "validation": sec.get("validation", 0.0),
        "checkpoint": sec.get("checkpoint", 0.0),
    }
    parts["other"] = total + sec["state_transfer"] - sum(parts.values())
    common.emit({
        "bench": "profile_round", "asr_config": opts.asr_config.name, "rounds": opts.rounds,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "total_s": round(total, 2),
        "seconds": {k: round(v, 2) for k, v in parts.items()},
        "share": {k: round(v / (total + sec["state_transfer"]), 3) for k, v in parts.items()},
    })


if __name__ == "__main__":
    main()
