"""Checkpoint averaging, the federated counterpart of ESPnet's `valid.acc.ave`.

ESPnet averages the N epoch checkpoints with the best validation accuracy into
`valid.acc.ave_<N>best.pth`. The federated trainer keeps the last few
`<N>round.pth`; among those, the N with the best `dev_acc` in metrics.jsonl are
averaged (the N latest when the rounds carry no dev accuracy).
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import torch

logger = logging.getLogger(__name__)

ROUND_CKPT = re.compile(r"^(\d+)round\.pth$")
AVE_NAME = re.compile(r"^valid\.acc\.ave(?:_(\d+)best)?(?:\.pth)?$")
ALIASES = {"best": "valid.acc.best.pth", "latest": "latest.pth", "ave": "valid.acc.ave.pth"}


def round_checkpoints(exp_dir: Path) -> dict[int, Path]:
    """{round: path} of the `<N>round.pth` files kept in exp_dir."""
    found = {int(m.group(1)): p for p in exp_dir.iterdir() if (m := ROUND_CKPT.match(p.name))}
    return dict(sorted(found.items()))


def _dev_acc_by_round(exp_dir: Path) -> dict[int, float]:
    path = exp_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["round"]: r["dev_acc"] for r in rows if r.get("dev_acc") is not None}


def select_checkpoints(exp_dir: Path, nbest: Optional[int]) -> dict[int, Path]:
    """{round: path} to average, in round order: the `nbest` kept rounds with the best
    dev_acc, like ESPnet's nbest, else the latest; every kept round when nbest is None."""
    ckpts = round_checkpoints(exp_dir)
    if not ckpts:
        raise FileNotFoundError(f"no <N>round.pth checkpoints in {exp_dir} to average")
    acc = _dev_acc_by_round(exp_dir)
    if all(r in acc for r in ckpts):
        ranked = sorted(ckpts, key=lambda r: (-acc[r], -r))
    else:
        logger.warning("metrics.jsonl lacks dev_acc for some kept rounds: averaging the latest ones")
        ranked = sorted(ckpts, reverse=True)
    if nbest is not None and nbest > len(ranked):
        logger.warning("asked to average %d checkpoints, only %d kept", nbest, len(ranked))
    return {r: ckpts[r] for r in sorted(ranked[:nbest])}


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
        state = torch.load(path, map_location="cpu", weights_only=True)
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
    Any other name is a file in exp_dir, or a path.
    """
    model = ALIASES.get(model, model)
    m = AVE_NAME.match(model)
    if m:
        ckpts = select_checkpoints(exp_dir, int(m.group(1)) if m.group(1) else None)
        out = exp_dir / (model if model.endswith(".pth") else model + ".pth")
        logger.info("averaging rounds %s -> %s", list(ckpts), out)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        torch.save(average_state_dicts(list(ckpts.values())), tmp)
        tmp.replace(out)
        return out
    for candidate in (exp_dir / model, Path(model)):
        if candidate.is_file():
            return candidate
    available = sorted(p.name for p in exp_dir.glob("*.pth"))
    raise FileNotFoundError(f"model {model!r} not found in {exp_dir}; available: {available}")
