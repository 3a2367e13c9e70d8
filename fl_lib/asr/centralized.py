"""The centralized reference: the same ESPnet model, trained by ESPnet's `Trainer` on the pooled data.

Every FL-for-ASR paper reports the gap between federated training and this run:
one model, all clients' utterances in one shuffled pool, ESPnet's own epoch loop
(`Trainer.train_one_epoch`, a batch-step `WarmupLR` schedule). Training is capped by a
budget of CPU-seconds, the currency of a federated run's `client_cpu_seconds`
(`time.process_time` of each client's local training, summed over workers): this run
spends as many CPU-seconds of its own process (`time.process_time`, all its threads),
counting training only, not validation. As in a federated run, the `<N>epoch.pth` of the
`keep_checkpoints` best epochs by `round_score` are kept, and a rerun into the same
output dir resumes from its `checkpoint.pth`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch
import yaml

from ..atomic import append_text, owned_temp_glob
from ..data.clients import load_clients
from ..data.dataset import make_dataloader
from ..data.markers import content_digest
from ..data.tokenizer import Tokenizer
from ..fl.checkpoint import (CheckpointError, atomic_copy, atomic_save, load_resumable, resume_differences, rng_states,
                             save_checkpoint, set_rng_states, truncate_metrics)
from ..fl.config import BEST_CRITERIA, FLConfig, load_config
from ..fl.validation import evaluate
from .average import criterion_score, rank_rounds, round_checkpoints, round_score, round_scores
from .model import build_asr_args, build_asr_model, espnet_config, save_espnet_config

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pth"
OWNER = "train_centralized"  # the tag of this trainer's temporary files (fl_lib.atomic)
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "budget", "rng", "best_score",
                   "centralized_config", "run_identity")
# Keys that change when training stops or which epochs are kept, never what an epoch
# computes: a resumed run may change them (a larger budget or max_epoch extends a run).
RESUME_MAY_CHANGE = ("max_epoch", "budget_cpu_seconds", "keep_checkpoints")


@dataclass
class CentralizedConfig:
    """ESPnet's training-loop settings for the pooled run (the keys `asr.sh` configs carry)."""

    lr: float = 2e-3  # Adam peak learning rate
    warmup_steps: int = 300  # ESPnet WarmupLR: linear warm-up, then lr ∝ step^-0.5
    grad_clip: float = 5.0
    max_duration: float = 30.0  # seconds of audio per batch
    max_epoch: int = 100
    budget_cpu_seconds: Optional[float] = None  # stop when training has spent this much process CPU time
    keep_checkpoints: int = 3  # the <N>epoch.pth of the N best epochs (round_score), as fl_train keeps rounds
    best_criterion: str = "acc"  # acc | loss | wer: what ranks epochs (best, kept, averaged), as fl_train's key

    def __post_init__(self) -> None:
        if self.budget_cpu_seconds is not None and self.budget_cpu_seconds <= 0:
            raise ValueError(f"budget_cpu_seconds must be > 0, got {self.budget_cpu_seconds}")
        if self.best_criterion not in BEST_CRITERIA:
            raise ValueError(f"best_criterion must be one of {BEST_CRITERIA}, got {self.best_criterion!r}")
        for key in ("max_epoch", "keep_checkpoints", "warmup_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

    @classmethod
    def from_yaml(cls, path: Optional[Path], overrides: Sequence[str] = ()) -> "CentralizedConfig":
        return load_config(cls, path, overrides)


class _Budget:
    """Yields batches until the process CPU time spent training reaches the budget (None: no cap).

    It counts what it let through: CPU-seconds (`time.process_time`, the budget's currency),
    wall-clock seconds, and batches: optimizer steps (accum_grad is 1), the compute axis
    shared with a federated run's client steps."""

    def __init__(self, cpu_seconds: Optional[float]) -> None:
        self.cpu_seconds = cpu_seconds
        self.spent = 0.0  # CPU-seconds
        self.wall = 0.0
        self.batches = 0

    def exhausted(self) -> bool:
        return self.cpu_seconds is not None and self.spent >= self.cpu_seconds

    def state_dict(self) -> dict:
        return {"spent": self.spent, "wall": self.wall, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.spent, self.wall, self.batches = state["spent"], state["wall"], state["batches"]

    def iterate(self, batches: Iterable) -> Iterator:
        cpu0, wall0 = time.process_time(), time.perf_counter()

        def count() -> None:
            nonlocal cpu0, wall0
            cpu, wall = time.process_time(), time.perf_counter()
            self.spent += cpu - cpu0
            self.wall += wall - wall0
            cpu0, wall0 = cpu, wall

        try:
            for batch in batches:
                if self.exhausted():
                    return
                self.batches += 1
                yield batch
                count()
        finally:
            count()


def pooled_cuts(train_clients: Path):
    """Every client's cuts in one eager CutSet: centralized training sees all the data at once."""
    from lhotse import CutSet, load_manifest_lazy

    cuts = []
    for client in load_clients(train_clients):
        cuts.extend(load_manifest_lazy(client.manifest))
    return CutSet.from_cuts(cuts)


def run_identity(espnet_args, train_clients: Path, seed: int) -> dict:
    """What else must match for a rerun to resume this experiment: the seed, the ESPnet
    config and the clients' manifests by content (as fl_train's resume check)."""
    return {
        "seed": seed,
        "espnet_config": espnet_config(espnet_args),
        "clients": {c.id: content_digest(c.manifest) for c in sorted(load_clients(train_clients), key=lambda c: c.id)},
    }


def _resumable(output_dir: Path, conf: CentralizedConfig, identity: dict) -> Optional[tuple[dict, Path]]:
    """checkpoint.pth of `output_dir` (loaded weights-only; the one before it if it is damaged)
    and its path, if there is one; a CheckpointError if it belongs to another experiment."""
    for stale in output_dir.glob(owned_temp_glob(OWNER)):  # half-written by a killed run
        stale.unlink()
    loaded = load_resumable(output_dir / CHECKPOINT, CHECKPOINT_KEYS, OWNER)
    if loaded is None:
        return None
    state, path = loaded
    differs = resume_differences(state["centralized_config"], dataclasses.asdict(CentralizedConfig()),
                                 dataclasses.asdict(conf), RESUME_MAY_CHANGE, state["run_identity"], identity)
    if differs:
        raise CheckpointError(
            f"{path} belongs to another experiment: {', '.join(differs)} differ. Resume needs the same centralized "
            f"config (except {', '.join(RESUME_MAY_CHANGE)}), ESPnet config, seed and clients (manifest content); "
            f"use another --output_dir, or remove {output_dir} to start over."
        )
    return state, path


def _start_over(output_dir: Path) -> None:
    """A new run: no <N>epoch.pth (or <N>round.pth) of an earlier run may join its average."""
    for path in round_checkpoints(output_dir).values():
        path.unlink()
    (output_dir / "metrics.jsonl").write_text("")


def train_centralized(
    conf: CentralizedConfig,
    *,
    asr_config: Path,
    train_clients: Path,
    token_list: Path,
    bpemodel: Path,
    output_dir: Path,
    feats_stats: Optional[Path] = None,
    dev_cuts: Optional[Path] = None,
    seed: int = 0,
    num_threads: int = 2,
) -> list[dict]:
    """Train (or resume) until `max_epoch` or the budget; returns every epoch's metric row."""
    from espnet2.schedulers.warmup_lr import WarmupLR
    from espnet2.train.distributed_utils import DistributedOption
    from espnet2.train.reporter import Reporter
    from espnet2.train.trainer import Trainer

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    args = build_asr_args(asr_config, token_list, bpemodel, feats_stats)
    args.grad_clip, args.accum_grad, args.log_interval = conf.grad_clip, 1, 10**9
    model = build_asr_model(args)
    optimizer = torch.optim.Adam(model.parameters(), lr=conf.lr)
    scheduler = WarmupLR(optimizer, warmup_steps=conf.warmup_steps)
    budget = _Budget(conf.budget_cpu_seconds)
    identity = run_identity(args, train_clients, seed)
    metrics = output_dir / "metrics.jsonl"
    loaded = _resumable(output_dir, conf, identity)  # refuses another experiment's dir before anything is rewritten (but a damaged checkpoint, moved aside)
    if loaded is None:
        _start_over(output_dir)
        done, best, rows = 0, -math.inf, []
    else:
        state, path = loaded
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        budget.load_state_dict(state["budget"])
        set_rng_states(state["rng"])
        done, best = state["epoch"], state["best_score"]
        rows = truncate_metrics(metrics, "epoch", done, OWNER)
        for epoch, epoch_file in round_checkpoints(output_dir).items():
            if epoch > done:  # written by the killed run after its last checkpoint
                epoch_file.unlink()
        logger.info(f"resumed from {path}: {done} epochs done, {budget.spent:.1f} CPU-s spent")
    save_espnet_config(args, output_dir / "config.yaml")
    (output_dir / "centralized_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(conf), sort_keys=False))
    (output_dir / "asr_config.yaml").write_text(Path(asr_config).read_text())
    if budget.exhausted():
        logger.info(f"training budget of {conf.budget_cpu_seconds:.1f} CPU-s already spent after {done} epochs")
        return rows

    tokenizer = Tokenizer(bpemodel, token_list)
    cuts = pooled_cuts(train_clients)
    options = Trainer.build_options(args)
    for epoch in range(done + 1, conf.max_epoch + 1):
        model.train()
        batches = make_dataloader(cuts, tokenizer, max_duration=conf.max_duration, shuffle=True, seed=seed, epoch=epoch)
        reporter = Reporter()
        with reporter.observe("train", epoch) as sub:
            Trainer.train_one_epoch(
                model=model, iterator=budget.iterate(batches), optimizers=[optimizer], schedulers=[scheduler],
                scaler=None, reporter=sub, summary_writer=None, options=options,
                distributed_option=DistributedOption(distributed=False),
            )
        row = {"epoch": epoch, "train_loss": float(reporter.get_value("train", "loss")),
               "train_cpu_seconds": budget.spent, "train_seconds": budget.wall, "steps": budget.batches,
               "lr": optimizer.param_groups[0]["lr"]}
        if dev_cuts is not None:
            dev = evaluate(model, make_dataloader(dev_cuts, tokenizer, max_duration=120.0), tokenizer)
            row.update(dev_loss=dev.get("loss"), dev_acc=dev.get("acc"), dev_wer=dev.get("wer"))
            row["dev_score"] = criterion_score(conf.best_criterion, row["dev_loss"], row["dev_acc"], row["dev_wer"])
        rows.append(row)
        append_text(metrics, json.dumps(row) + "\n")
        logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        path = output_dir / f"{epoch}epoch.pth"
        atomic_save(model.state_dict(), path, OWNER)
        atomic_copy(path, output_dir / "latest.pth", OWNER)
        # As fl_train: the best by the dev criterion; without a dev set (or score), the latest.
        score = round_score(row)
        if score is not None and score > best:
            best = score
            atomic_copy(path, output_dir / "valid.acc.best.pth", OWNER)
        elif dev_cuts is None or not (output_dir / "valid.acc.best.pth").exists():
            atomic_copy(path, output_dir / "valid.acc.best.pth", OWNER)
        # ESPnet's keep_nbest_models, as fl_train keeps rounds: the best epochs, not the latest.
        kept = round_checkpoints(output_dir)
        for worse in rank_rounds(kept, round_scores(output_dir))[conf.keep_checkpoints :]:
            kept[worse].unlink()
        save_checkpoint({
            "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "budget": budget.state_dict(), "rng": rng_states(),
            "best_score": best, "centralized_config": dataclasses.asdict(conf), "run_identity": identity,
        }, output_dir / CHECKPOINT, OWNER)
        if budget.exhausted():
            logger.info(f"training budget of {conf.budget_cpu_seconds:.1f} CPU-s spent after {epoch} epochs")
            break
    return rows


def federated_best_criterion(exp_dir: Path) -> str:
    """The `best_criterion` a federated run ranked its rounds by (its fl_config.yaml)."""
    conf = yaml.safe_load((Path(exp_dir) / "fl_config.yaml").read_text()) or {}
    return conf.get("best_criterion", FLConfig().best_criterion)


def federated_client_cpu_seconds(exp_dir: Path) -> float:
    """A federated run's client CPU-seconds: its rounds' `client_cpu_seconds` (time.process_time
    of each used client's local training, summed over workers) in metrics.jsonl, summed."""
    rows = [json.loads(line) for line in (Path(exp_dir) / "metrics.jsonl").read_text().splitlines() if line]
    if not rows:
        raise ValueError(f"{exp_dir}/metrics.jsonl has no rounds")
    missing = [r["round"] for r in rows if "client_cpu_seconds" not in r]
    if missing:
        raise ValueError(f"{exp_dir}/metrics.jsonl: rounds {missing} carry no client_cpu_seconds (an fl_lib older "
                         "than the CPU-second budget): rerun that federated training, or give budget_cpu_seconds=")
    return sum(r["client_cpu_seconds"] for r in rows)
