"""Build a stock ESPnet ASR model from an ESPnet training YAML, and save it ESPnet's way.

The federated loop reuses one model object for every client; the only thing that
makes it "federated" is which weights are loaded into it. The `config.yaml` saved
beside the weights is ESPnet's own, so `Speech2Text` loads the result unchanged.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch
import yaml

from ..espnet_env import asr_task


# ESPnet training-loop options of a stock asr.sh config: the federated loop (client
# optimizer, local epochs, Lhotse batches, rounds) replaces them, so they would do nothing.
TRAINING_LOOP_KEYS = frozenset({
    "optim", "optim_conf", "scheduler", "scheduler_conf", "batch_type", "batch_size", "batch_bins",
    "valid_batch_type", "valid_batch_size", "valid_batch_bins", "max_epoch", "accum_grad", "grad_clip",
    "grad_clip_type", "grad_noise", "patience", "early_stopping_criterion", "best_model_criterion",
    "keep_nbest_models", "nbest_averaging_interval", "num_iters_per_epoch", "use_amp", "num_workers",
    "val_scheduler_criterion", "sort_in_batch", "sort_batch", "shuffle_within_batch", "resume", "ngpu",
})

# What ASRTask.build_model reads (token_list, token_type and bpemodel come from stage 4),
# plus the keys `build_asr_model` applies the way AbsTask.main_worker does.
MODEL_KEYS = frozenset({
    "frontend", "frontend_conf", "specaug", "specaug_conf", "normalize", "normalize_conf", "model", "model_conf",
    "preencoder", "preencoder_conf", "encoder", "encoder_conf", "postencoder", "postencoder_conf", "decoder",
    "decoder_conf", "ctc_conf", "joint_net_conf", "init", "input_size", "token_list", "token_type", "bpemodel",
})
APPLIED_KEYS = frozenset({"init_param", "ignore_init_mismatch", "freeze_param"})


def build_asr_args(
    asr_config: Path,
    token_list: Path,
    bpemodel: Optional[Path],
    feats_stats: Optional[Path],
) -> argparse.Namespace:
    """ESPnet's ASR argument namespace: parser defaults, then the YAML, then our data paths."""
    ASRTask = asr_task()
    args = ASRTask.get_parser().parse_args([])
    with open(asr_config) as f:
        conf = yaml.safe_load(f) or {}
    unknown = sorted(k for k in conf if not hasattr(args, k))
    if unknown:
        raise ValueError(f"{asr_config}: not ESPnet ASR options: {', '.join(unknown)}")
    replaced = sorted(set(conf) & TRAINING_LOOP_KEYS)
    if replaced:
        raise ValueError(
            f"{asr_config}: {', '.join(replaced)} configure ESPnet's own training loop, which federated "
            "training replaces; remove them and set the fl_config's client.optim, client.lr, client.grad_clip, "
            "client.accum_grad, client.local_epochs / max_steps, client.max_duration and rounds instead"
        )
    ignored = sorted(
        k for k in set(conf) - TRAINING_LOOP_KEYS - MODEL_KEYS - APPLIED_KEYS if conf[k] != getattr(args, k)
    )
    if ignored:
        raise ValueError(
            f"{asr_config}: {', '.join(ignored)} take effect only inside ESPnet's AbsTask.main_worker or its "
            "data pipeline (preprocessor, iterators, dtype, distributed set-up), which federated training does "
            "not run; remove them (the seed is fl_train --seed)"
        )
    for key, value in conf.items():
        setattr(args, key, value)
    with open(token_list, encoding="utf-8") as f:
        args.token_list = [line.rstrip("\n") for line in f if line.strip()]
    if bpemodel is not None:
        args.token_type = "bpe"
        args.bpemodel = str(bpemodel)
    if args.normalize == "global_mvn":
        if feats_stats is None:
            raise ValueError(f"{asr_config} uses normalize: global_mvn but no feats_stats.npz was given (stage 3)")
        args.normalize_conf = {**(args.normalize_conf or {}), "stats_file": str(feats_stats)}
    args.ngpu = 0
    return args


def build_asr_model(args: argparse.Namespace) -> torch.nn.Module:
    """ESPnet's model, all in float32, with `init_param` loaded and `freeze_param` frozen.

    float32: global_mvn loads float64 stats, which would otherwise make the
    pseudo-gradient of its buffers pure rounding noise. `init_param` and
    `freeze_param` are applied as AbsTask.main_worker applies them (ESPnet's own
    `load_pretrained_model`, prefix match), because that function never runs here:
    federated transfer learning and session adaptation start from a seed model.
    """
    from espnet2.torch_utils.load_pretrained_model import load_pretrained_model

    model = asr_task().build_model(args).float()
    for init in args.init_param:
        load_pretrained_model(init_param=init, model=model, ignore_init_mismatch=args.ignore_init_mismatch, map_location="cpu")
    for prefix in args.freeze_param:
        frozen = [p for name, p in model.named_parameters() if name == prefix or name.startswith(prefix + ".")]
        if not frozen:
            raise ValueError(f"freeze_param '{prefix}' matches no parameter of the model")
        for p in frozen:
            p.requires_grad = False
    return model


def espnet_config(args: argparse.Namespace) -> dict:
    """Every ASR option as plain YAML-safe values: what `config.yaml` holds."""
    return _plain(vars(args))


def save_espnet_config(args: argparse.Namespace, path: Path) -> None:
    """ESPnet's `config.yaml`, as `asr_train.py` writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(espnet_config(args), f, indent=4, sort_keys=False, allow_unicode=True)


def _plain(obj):
    """Paths and tuples to YAML-safe strings and lists."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
