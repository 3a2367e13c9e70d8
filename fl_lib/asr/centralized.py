"""The centralized reference: the same ESPnet model, trained by ESPnet's `Trainer` on the pooled data.

Every FL-for-ASR paper reports the gap between federated training and this run:
one model, all clients' utterances in one shuffled pool, ESPnet's own epoch loop
(`Trainer.train_one_epoch`, a batch-step `WarmupLR` schedule). Training time is
capped by a wall-clock budget, so that the comparison with a federated run is at
equal training time; validation is not counted in the budget, as it is not in
the federated run's training time.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch
import yaml

from ..data.clients import load_clients
from ..data.dataset import make_dataloader
from ..data.tokenizer import Tokenizer
from ..fl.checkpoint import atomic_copy, atomic_save
from ..fl.config import load_config
from ..fl.validation import evaluate
from .average import round_score
from .model import build_asr_args, build_asr_model, save_espnet_config

logger = logging.getLogger(__name__)


@dataclass
class CentralizedConfig:
    """ESPnet's training-loop settings for the pooled run (the keys `asr.sh` configs carry)."""

    lr: float = 2e-3  # Adam peak learning rate
    warmup_steps: int = 300  # ESPnet WarmupLR: linear warm-up, then lr ∝ step^-0.5
    grad_clip: float = 5.0
    max_duration: float = 30.0  # seconds of audio per batch
    max_epoch: int = 100
    budget_minutes: Optional[float] = None  # stop when this much training time is spent
    keep_checkpoints: int = 3

    def __post_init__(self) -> None:
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise ValueError(f"budget_minutes must be > 0, got {self.budget_minutes}")
        for key in ("max_epoch", "keep_checkpoints", "warmup_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

    @classmethod
    def from_yaml(cls, path: Optional[Path], overrides: Sequence[str] = ()) -> "CentralizedConfig":
        return load_config(cls, path, overrides)


class _Budget:
    """Yields batches until the training time spent reaches the budget (None: no cap).

    It also counts the batches it let through: optimizer steps (accum_grad is 1), the
    compute axis shared with a federated run's client steps."""

    def __init__(self, seconds: Optional[float]) -> None:
        self.seconds = seconds
        self.spent = 0.0
        self.batches = 0

    def exhausted(self) -> bool:
        return self.seconds is not None and self.spent >= self.seconds

    def iterate(self, batches: Iterable) -> Iterator:
        t0 = time.perf_counter()
        try:
            for batch in batches:
                if self.exhausted():
                    return
                self.batches += 1
                yield batch
                now = time.perf_counter()
                self.spent += now - t0
                t0 = now
        finally:
            self.spent += time.perf_counter() - t0


def pooled_cuts(train_clients: Path):
    """Every client's cuts in one eager CutSet: centralized training sees all the data at once."""
    from lhotse import CutSet, load_manifest_lazy

    cuts = []
    for client in load_clients(train_clients):
        cuts.extend(load_manifest_lazy(client.manifest))
    return CutSet.from_cuts(cuts)


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
    """Train until `max_epoch` or the budget; returns the metric rows (one per epoch)."""
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
    save_espnet_config(args, output_dir / "config.yaml")
    (output_dir / "centralized_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(conf), sort_keys=False))
    (output_dir / "asr_config.yaml").write_text(Path(asr_config).read_text())

    tokenizer = Tokenizer(bpemodel, token_list)
    cuts = pooled_cuts(train_clients)
    optimizer = torch.optim.Adam(model.parameters(), lr=conf.lr)
    scheduler = WarmupLR(optimizer, warmup_steps=conf.warmup_steps)
    options = Trainer.build_options(args)
    budget = _Budget(None if conf.budget_minutes is None else conf.budget_minutes * 60)
    rows: list[dict] = []
    best = -float("inf")
    metrics = output_dir / "metrics.jsonl"
    metrics.write_text("")
    for epoch in range(1, conf.max_epoch + 1):
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
               "train_seconds": budget.spent, "steps": budget.batches, "lr": optimizer.param_groups[0]["lr"]}
        if dev_cuts is not None:
            dev = evaluate(model, make_dataloader(dev_cuts, tokenizer, max_duration=120.0), tokenizer)
            row.update(dev_loss=dev.get("loss"), dev_acc=dev.get("acc"), dev_wer=dev.get("wer"))
        rows.append(row)
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        path = output_dir / f"{epoch}epoch.pth"
        atomic_save(model.state_dict(), path)
        atomic_copy(path, output_dir / "latest.pth")
        # The federated run's dev criterion; without a dev set, the latest epoch is the best.
        score = round_score(row)
        score = epoch if score is None else score
        if score > best:
            best = score
            atomic_copy(path, output_dir / "valid.acc.best.pth")
        (output_dir / f"{epoch - conf.keep_checkpoints}epoch.pth").unlink(missing_ok=True)
        if budget.exhausted():
            logger.info(f"training budget of {conf.budget_minutes} min spent after {epoch} epochs")
            break
    return rows


def federated_training_minutes(exp_dir: Path) -> float:
    """A federated run's training time (clients, aggregation, server step; no validation), in minutes."""
    rows = [json.loads(line) for line in (Path(exp_dir) / "metrics.jsonl").read_text().splitlines() if line]
    if not rows:
        raise ValueError(f"{exp_dir}/metrics.jsonl has no rounds")
    missing = [r["round"] for r in rows if "train_seconds" not in r]
    if missing:
        raise ValueError(f"{exp_dir}/metrics.jsonl: rounds {missing} carry no train_seconds (older fl_lib)")
    return sum(r["train_seconds"] for r in rows) / 60
