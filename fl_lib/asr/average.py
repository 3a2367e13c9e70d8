"""Checkpoint averaging, the federated counterpart of ESPnet's `valid.acc.ave`.

As ESPnet's `keep_nbest_models`, the trainer keeps the `<N>round.pth` of the N best
rounds by the dev criterion (`round_score`), and averaging takes the N best of those.
The centralized reference keeps `<N>epoch.pth` files and logs `epoch` in metrics.jsonl;
they are averaged the same way, so `--inference_model valid.acc.ave` decodes both.
The criterion is the one `valid.acc.best.pth` is chosen by (fl_train's `best_criterion`,
recorded per round as `dev_score`; by default dev accuracy, or minus the dev loss for a
model that reports no accuracy), so "best" and "average" never disagree on what good means.

Why not ESPnet's own `average_nbest_models`: it ranks the `<N>epoch.pth` files of a
`Reporter` that holds the whole training history in memory, writes its output in
place (two decode jobs averaging the same model would read a half-written file),
averages in float32, and sums integer buffers (BatchNorm's num_batches_tracked)
across checkpoints. Here the history is metrics.jsonl, sums are float64, and
every write is atomic.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from ..atomic import atomic_path
from ..fl.checkpoint import load_weights
from ..fl.config import BEST_CRITERIA

logger = logging.getLogger(__name__)

ROUND_CKPT = re.compile(r"^(\d+)(?:round|epoch)\.pth$")
AVE_NAME = re.compile(r"^valid\.acc\.ave(?:_(\d+)best)?(?:\.pth)?$")
ALIASES = {"best": "valid.acc.best.pth", "latest": "latest.pth", "ave": "valid.acc.ave.pth"}


def round_checkpoints(exp_dir: Path) -> dict[int, Path]:
    """{round: path} of the `<N>round.pth` (or the centralized `<N>epoch.pth`) files kept in exp_dir."""
    found = {int(m.group(1)): p for p in exp_dir.iterdir() if (m := ROUND_CKPT.match(p.name))}
    return dict(sorted(found.items()))


def criterion_score(criterion: str, dev_loss: Optional[float], dev_acc: Optional[float], dev_wer: Optional[float]) -> Optional[float]:
    """The dev score a validated round is ranked by, higher is better; None when nothing was validated.

    acc: dev accuracy, or minus the dev loss for a model that reports none (CTC-only), as
    ESPnet's valid.acc falls back; loss: minus the dev loss; wer: minus the CTC-greedy dev WER,
    for a CTC-only model whose loss stops tracking its errors (a few noisy labels).
    """
    if criterion not in BEST_CRITERIA:
        raise ValueError(f"best_criterion must be one of {BEST_CRITERIA}, got {criterion!r}")
    if dev_loss is None and dev_acc is None and dev_wer is None:
        return None
    if criterion == "wer":
        if dev_wer is None:
            raise ValueError("best_criterion: wer needs the CTC-greedy dev WER, which a model without a CTC head does not give")
        return -dev_wer
    if criterion == "acc" and dev_acc is not None:
        return dev_acc
    return None if dev_loss is None else -dev_loss


def round_score(row: dict) -> Optional[float]:
    """Higher is better: the `dev_score` the run ranked the round by (fl_train's best_criterion),
    or, for rows without one (runs older than best_criterion), dev accuracy or minus the
    dev loss; None for a round that was not validated."""
    if "dev_score" in row:
        return row["dev_score"]
    return criterion_score("acc", row.get("dev_loss"), row.get("dev_acc"), None)


def round_scores(exp_dir: Path) -> dict[int, float]:
    """{round: round_score} of the validated rounds in exp_dir/metrics.jsonl."""
    path = exp_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r.get("round", r.get("epoch")): s for r in rows if (s := round_score(r)) is not None}


def rank_rounds(rounds: Iterable[int], scores: dict[int, float]) -> list[int]:
    """Best first; rounds without a dev score after every scored one, the newest first."""
    return sorted(rounds, key=lambda r: (r in scores, scores.get(r, 0.0), r), reverse=True)


def select_checkpoints(exp_dir: Path, nbest: Optional[int]) -> dict[int, Path]:
    """{round: path} to average, in round order: the `nbest` kept rounds with the best
    `round_score`; every kept round when nbest is None."""
    ckpts = round_checkpoints(exp_dir)
    if not ckpts:
        raise FileNotFoundError(f"no <N>round.pth or <N>epoch.pth checkpoints in {exp_dir} to average")
    scores = round_scores(exp_dir)
    if not all(r in scores for r in ckpts):
        logger.warning("metrics.jsonl has no dev score for some kept rounds: they rank after the validated ones")
    if nbest is not None and nbest > len(ckpts):
        logger.warning("asked to average %d checkpoints, only %d kept", nbest, len(ckpts))
    return {r: ckpts[r] for r in sorted(rank_rounds(ckpts, scores)[:nbest])}


def average_state_dicts(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors, summed in float64.

    Integer tensors (BatchNorm's num_batches_tracked) cannot be meaningfully
    averaged; they are taken from the last path.
    """
    if not paths:
        raise ValueError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in paths:
        state = load_weights(path)
        if dtypes and state.keys() != dtypes.keys():
            raise ValueError(f"{path} has different parameters from {paths[0]}")
        for key, value in state.items():
            dtypes[key] = value.dtype
            if value.is_floating_point():
                total[key] = total[key] + value.double() if key in total else value.double()
            else:
                total[key] = value
    return {
        k: (v / len(paths)).to(dtypes[k]) if dtypes[k].is_floating_point else v
        for k, v in total.items()
    }


def resolve_model(exp_dir: Path, model: str) -> Path:
    """Map run.sh's `--model` to a state_dict file, averaging when the name asks for it.

    `best`, `latest` and `ave` stand for valid.acc.best.pth, latest.pth and
    valid.acc.ave.pth. `valid.acc.ave[.pth]` averages every kept round checkpoint,
    `valid.acc.ave_<N>best.pth` the N best; the result is written into exp_dir
    under that name (atomically, so parallel decodes may share it).
    Any other name is a file in exp_dir, or a path. A file that does not load weights-only is
    a `CheckpointError` naming it.
    """
    model = ALIASES.get(model, model)
    m = AVE_NAME.match(model)
    if m:
        ckpts = select_checkpoints(exp_dir, int(m.group(1)) if m.group(1) else None)
        out = exp_dir / (model if model.endswith(".pth") else model + ".pth")
        logger.info("averaging rounds %s -> %s", list(ckpts), out)
        with atomic_path(out) as tmp:
            torch.save(average_state_dicts(list(ckpts.values())), tmp)
        return out
    for candidate in (exp_dir / model, Path(model)):
        if candidate.is_file():
            load_weights(candidate)  # a damaged file is named here, not in each decoding worker's trace
            return candidate
    available = sorted(p.name for p in exp_dir.glob("*.pth"))
    raise FileNotFoundError(f"model {model!r} not found in {exp_dir}; available: {available}")
