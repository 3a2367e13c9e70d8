"""A pull towards the seed after adaptation: weight-space interpolation (WiSE-FT).

Adaptation on pseudo-labels moves the seed towards what the labels say, their errors included;
the seed knows the language the labels' errors break. Interpolating the weights,
theta = (1 - alpha) * theta_seed + alpha * theta_adapted, keeps a share of each: alpha = 1 is
the adapted model, alpha = 0 the seed (Wortsman et al., "Robust fine-tuning of zero-shot
models", CVPR 2022). It needs no training, so every alpha can be decoded on the dev parts with
the reported decoding and the best one kept (fl_lib.asr.tune_decoding).

A straight line between two models is only meaningful when one was trained from the other:
both must hold the same parameters with the same shapes, or the interpolation is refused.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from ..asr.average import resolve_model
from ..fl.checkpoint import atomic_save, load_weights

logger = logging.getLogger(__name__)


def interpolate_state_dicts(seed: dict[str, torch.Tensor], adapted: dict[str, torch.Tensor],
                            alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * seed + alpha * adapted for floating-point tensors, computed in float64 and
    cast back to the adapted dtype. Integer tensors (BatchNorm's num_batches_tracked) are counters,
    not coordinates: they are taken from the adapted model."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (0: the seed, 1: the adapted model), got {alpha}")
    if seed.keys() != adapted.keys():
        only = sorted(set(seed) ^ set(adapted))
        raise ValueError(f"the seed and the adapted model hold different parameters, e.g. {only[:3]}: "
                         "interpolation needs a model adapted from this seed")
    out: dict[str, torch.Tensor] = {}
    for key, value in adapted.items():
        if seed[key].shape != value.shape:
            raise ValueError(f"{key}: shape {tuple(seed[key].shape)} in the seed, {tuple(value.shape)} adapted")
        if value.is_floating_point():
            mixed = (1.0 - alpha) * seed[key].double() + alpha * value.double()
            out[key] = mixed.to(value.dtype)
        else:
            out[key] = value
    return out


def interpolation_name(model: str, alpha: float) -> str:
    """The file an interpolation is written to, beside the adapted model: wiseft<alpha>_<model>."""
    return f"wiseft{alpha:g}_{Path(model).name}"


def write_interpolations(exp_dir: Path, model: str, seed_model: Path, alphas: Sequence[float]) -> list[str]:
    """Write one interpolation of the adapted `model` (a name as decode's --model takes) with
    seed_model per alpha into exp_dir; returns their file names, in the order of `alphas`."""
    if not alphas:
        raise ValueError("no alphas to interpolate at")
    if len(set(alphas)) != len(alphas):
        raise ValueError(f"an alpha is given twice: {list(alphas)}")
    exp_dir = Path(exp_dir)
    model_path = resolve_model(exp_dir, model)
    seed, adapted = load_weights(Path(seed_model)), load_weights(model_path)
    names = []
    for alpha in alphas:
        name = interpolation_name(model_path.name, alpha)
        atomic_save(interpolate_state_dicts(seed, adapted, alpha), exp_dir / name)
        logger.info("%s: %g x %s + %g x %s", exp_dir / name, 1.0 - alpha, seed_model, alpha, model_path.name)
        names.append(name)
    return names
