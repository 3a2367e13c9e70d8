"""One client's local training: ESPnet's own `Trainer.train_one_epoch` on the client's data.

A single ESPnet model object serves every client: it is loaded with the round's
start weights, trained on the client's lazy Lhotse CutSet, and its difference
to the start weights is returned as the pseudo-gradient.
"""
from __future__ import annotations

import argparse
import itertools
import math
import time
from typing import Iterable, Iterator

import torch
from espnet2.schedulers.abs_scheduler import AbsBatchStepScheduler

from .config import ClientConfig
from .sampling import derive_seed
from .strategies.base import ClientResult, State

FRAME_SHIFT_SAMPLES = 160  # 10 ms at 16 kHz: what "frames" counts in client statistics


class ProximalModel(torch.nn.Module):
    """Adds FedProx's μ/2·‖w − w_start‖² to the ESPnet loss, once per forward (= per step)."""

    def __init__(self, model: torch.nn.Module, start: State, mu: float) -> None:
        super().__init__()
        self.model = model
        self.mu = mu
        self._pairs = [(p, start[name]) for name, p in model.named_parameters() if p.requires_grad]

    def forward(self, **batch):
        loss, stats, weight = self.model(**batch)
        prox = sum(((p - anchor) ** 2).sum() for p, anchor in self._pairs)
        return loss + 0.5 * self.mu * prox, stats, weight


class _Counter:
    """Counts utterances, frames, target tokens and batches passing through to ESPnet."""

    def __init__(self, batches: Iterable) -> None:
        self.batches = batches
        self.utts = self.frames = self.tokens = self.batches_seen = 0

    def __iter__(self) -> Iterator:
        for utt_ids, batch in self.batches:
            self.utts += len(utt_ids)
            self.tokens += int(batch["text_lengths"].sum())
            self.frames += int(batch["speech_lengths"].sum()) // FRAME_SHIFT_SAMPLES
            self.batches_seen += 1
            yield utt_ids, batch


def build_client_optimizer(params, conf: ClientConfig, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """The round's client optimizer at LR `conf.lr * lr_scale` (the per-round schedule's factor)."""
    lr = conf.lr * lr_scale
    if conf.optim == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=conf.momentum, weight_decay=conf.weight_decay)
    if conf.optim == "adam":
        if conf.momentum:
            raise ValueError("client.momentum is an sgd option; adam does not use it")
        return torch.optim.Adam(params, lr=lr, weight_decay=conf.weight_decay)
    raise ValueError(f"unknown client.optim '{conf.optim}'; choose sgd or adam")


class LocalWarmupLR(torch.optim.lr_scheduler.LambdaLR, AbsBatchStepScheduler):
    """LR × min(1, (s+1)/warmup_steps) at local step s. An ESPnet batch-step scheduler,
    so `train_one_epoch` steps it after each optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int) -> None:
        super().__init__(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))


def trained_entries(model: torch.nn.Module) -> list[str]:
    """What local training changes in `model`'s state, and so what Δ covers: the trainable
    parameters, and the running mean and variance of its BatchNorm layers (train mode updates
    them). Frozen parameters and constants (ESPnet's mel filterbank, the feature normalization)
    stay the server's: no client can move them, nor can noise under privacy.*."""
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)
    trained = {f"{name}.{stat}" for name, m in model.named_modules() if isinstance(m, norms) and m.track_running_stats
               for stat in ("running_mean", "running_var")}
    trained |= {name for name, p in model.named_parameters() if p.requires_grad}
    return [name for name in model.state_dict() if name in trained]  # in the state's order


def pseudo_gradient(start: State, model: torch.nn.Module) -> tuple[State, dict, bool]:
    """Δ = w_start − w_local over the trained entries, its statistics and whether it is finite.

    Statistics are over the trainable parameters' entries, accumulated in float64:
    mean, RMS and the (population) variance — a real variance, unlike FLUTE's.
    """
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    delta: State = {}
    s1 = s2 = 0.0
    n = 0
    finite = True
    for name in trained_entries(model):
        d = start[name] - state[name]
        delta[name] = d
        finite = finite and bool(torch.isfinite(d).all())  # BatchNorm's statistics too: they get averaged
        if name in trainable:
            d64 = d.double()
            s1 += d64.sum().item()
            s2 += d64.square().sum().item()
            n += d.numel()
    mean = s1 / max(n, 1)
    stats = {"grad_mean": mean, "grad_rms": math.sqrt(s2 / max(n, 1)), "grad_var": max(s2 / max(n, 1) - mean * mean, 0.0)}
    return delta, stats, finite


class LocalTrainer:
    """Runs a client's local steps with ESPnet's trainer on a shared model object."""

    def __init__(self, model: torch.nn.Module, espnet_args: argparse.Namespace, conf: ClientConfig, make_batches, seed: int) -> None:
        from espnet2.train.distributed_utils import DistributedOption
        from espnet2.train.trainer import Trainer

        if conf.local_epochs < 1:
            raise ValueError(f"client.local_epochs must be >= 1, got {conf.local_epochs}")
        self.model = model
        self.conf = conf
        self.make_batches = make_batches  # (manifest, seed) -> iterable of (utt_ids, batch)
        self.seed = seed
        args = argparse.Namespace(**vars(espnet_args))
        args.grad_clip = conf.grad_clip
        args.accum_grad = conf.accum_grad
        args.log_interval = 10**9  # the server logs one line per client, not per step
        args.ngpu = int(next(model.parameters()).is_cuda)  # ESPnet moves each batch to "cuda" when > 0
        if conf.use_amp and not args.ngpu:
            raise ValueError("client.use_amp is mixed precision on the GPU: it needs --ngpu 1 (the model is on the CPU)")
        self.options = Trainer.build_options(args)
        self.trainer = Trainer
        self.distributed = DistributedOption(distributed=False)

    def _batches(self, manifest, round_idx: int, client_id: str) -> Iterable:
        epochs = (
            self.make_batches(manifest, derive_seed(self.seed, "batches", round_idx, client_id, epoch))
            for epoch in range(self.conf.local_epochs)
        )
        batches = itertools.chain.from_iterable(epochs)
        if self.conf.max_steps is not None:
            batches = itertools.islice(batches, self.conf.max_steps * self.conf.accum_grad)
        return batches

    def train(
        self, client_id: str, manifest, start: State, round_idx: int, proximal_mu: float = 0.0, lr_scale: float = 1.0
    ) -> ClientResult:
        from espnet2.train.reporter import Reporter

        t0, cpu0 = time.perf_counter(), time.process_time()
        torch.manual_seed(derive_seed(self.seed, "torch", round_idx, client_id))
        self.model.load_state_dict(start)
        # ESPnet zeroes gradients only after an optimizer step: with accum_grad > 1 the
        # last client's unstepped batches would otherwise flow into this client's first step.
        self.model.zero_grad(set_to_none=True)
        optimizer = build_client_optimizer(self.model.parameters(), self.conf, lr_scale)
        warmup = LocalWarmupLR(optimizer, self.conf.warmup_steps) if self.conf.warmup_steps else None
        net = ProximalModel(self.model, start, proximal_mu) if proximal_mu > 0 else self.model
        counter = _Counter(self._batches(manifest, round_idx, client_id))
        reporter = Reporter()
        with reporter.observe("train", 1) as sub:
            all_steps_invalid = self.trainer.train_one_epoch(
                model=net,
                iterator=counter,
                optimizers=[optimizer],
                schedulers=[warmup],
                # ESPnet autocasts the forward pass (bf16 where supported) exactly when a scaler is given.
                scaler=torch.amp.GradScaler("cuda") if self.conf.use_amp else None,
                reporter=sub,
                summary_writer=None,
                options=self.options,
                distributed_option=self.distributed,
            )
        if counter.batches_seen == 0:
            raise RuntimeError(f"client {client_id}: no batch came out of {manifest}")
        train_loss = float(reporter.get_value("train", "loss"))
        delta, stats, finite = pseudo_gradient(start, self.model)
        return ClientResult(
            client_id=client_id,
            delta=delta,
            num_utts=counter.utts,
            num_frames=counter.frames,
            num_tokens=counter.tokens,
            train_loss=train_loss,
            num_steps=counter.batches_seen // self.conf.accum_grad,  # ESPnet steps every accum_grad batches
            seconds=time.perf_counter() - t0,
            cpu_seconds=time.process_time() - cpu0,
            delta_finite=finite,
            all_steps_invalid=all_steps_invalid,
            **stats,
        )
