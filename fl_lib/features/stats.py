"""Stage 3: global mean/variance statistics of the model's input features, computed federatedly.

ESPnet's `global_mvn` needs the frame count, sum and sum of squares of the
features its frontend produces. These are plain sums, so each client computes
them on its own audio and the server adds them up: the result equals the
central statistics, and only three aggregate vectors leave a client.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import operator
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from lhotse import CutSet, load_manifest_lazy
from tqdm import tqdm

from fl_lib.atomic import atomic_path
from fl_lib.data.dataset import load_speech

logger = logging.getLogger(__name__)


@dataclass
class FeatsStats:
    """Frame count, per-dimension sum and sum of squares (float64 to keep large sums exact)."""

    count: int
    sum: np.ndarray
    sum_square: np.ndarray

    def __add__(self, other: FeatsStats) -> FeatsStats:
        if self.sum.shape != other.sum.shape:
            raise ValueError(f"feature dims differ: {self.sum.shape} vs {other.sum.shape}")
        return FeatsStats(
            self.count + other.count, self.sum + other.sum, self.sum_square + other.sum_square
        )

    def save(self, path: Path) -> Path:
        """Write ESPnet's `feats_stats.npz` (keys count, sum, sum_square), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            np.savez(tmp, count=np.int64(self.count), sum=self.sum, sum_square=self.sum_square)
        return path

    @classmethod
    def load(cls, path: Path) -> FeatsStats:
        with np.load(path) as stats:
            return cls(
                int(stats["count"]),
                stats["sum"].astype(np.float64),
                stats["sum_square"].astype(np.float64),
            )


def build_frontend(asr_config: Path) -> torch.nn.Module:
    """The ASR model's frontend from an ESPnet asr_config, as `ASRTask.build_model` builds it."""
    from fl_lib.espnet_env import asr_task

    asr_task()
    from espnet2.tasks.asr import frontend_choices

    config = yaml.safe_load(Path(asr_config).read_text(encoding="utf-8")) or {}
    name = config.get("frontend", "default")
    if name is None:
        raise ValueError(f"{asr_config}: frontend is null; feature statistics need a frontend")
    frontend = frontend_choices.get_class(name)(**(config.get("frontend_conf") or {}))
    return frontend.eval()


@torch.no_grad()
def utterance_feats(speech: np.ndarray, frontend: torch.nn.Module) -> np.ndarray:
    """Frontend features [T, D] of one utterance, without padding effects of a batch."""
    wav = torch.from_numpy(speech)[None]
    feats, lengths = frontend(wav, torch.tensor([wav.shape[1]]))
    return feats[0, : int(lengths[0])].numpy()


def client_feats_stats(cuts: CutSet, frontend: torch.nn.Module) -> FeatsStats:
    """Sums over the frontend features of every cut; runs on the client's own data."""
    stats = None
    for cut in cuts:
        feats = utterance_feats(load_speech(cut), frontend).astype(np.float64)
        part = FeatsStats(len(feats), feats.sum(0), (feats**2).sum(0))
        stats = part if stats is None else stats + part
    if stats is None:
        raise ValueError("no cuts to compute feature statistics from")
    return stats


def _inputs_signature(clients_jsonl: Path, asr_config: Path) -> dict:
    """What the statistics depend on: the client list, every client's cuts, and the frontend settings."""
    from fl_lib.data.clients import load_clients

    config = yaml.safe_load(Path(asr_config).read_text(encoding="utf-8")) or {}
    manifests = hashlib.sha256()
    for client in load_clients(clients_jsonl):
        manifests.update(client.manifest.read_bytes())
    return {
        "clients_sha256": hashlib.sha256(Path(clients_jsonl).read_bytes()).hexdigest(),
        "manifests_sha256": manifests.hexdigest(),
        "frontend": config.get("frontend", "default"),
        "frontend_conf": config.get("frontend_conf") or {},
    }


def federated_feats_stats(clients_jsonl: Path, asr_config: Path, output_dir: Path) -> Path:
    """Each client sums its own features into `clients/<id>.npz`; the server adds them.

    Returns `output_dir/feats_stats.npz`. Re-runs skip finished clients and the
    whole stage once `.done` exists; statistics made from other inputs are removed
    and recomputed, never mixed with new ones.
    """
    from fl_lib.data.clients import load_clients, safe_file_name

    output_dir = Path(output_dir)
    stats_file = output_dir / "feats_stats.npz"
    done = output_dir / ".done"
    inputs = output_dir / "inputs.json"
    signature = _inputs_signature(clients_jsonl, asr_config)
    if inputs.exists():
        previous = json.loads(inputs.read_text(encoding="utf-8"))
        if previous != signature:
            logger.warning(
                "%s holds statistics of other clients or another frontend (%s): recomputing", output_dir, inputs
            )
            done.unlink(missing_ok=True)
            stats_file.unlink(missing_ok=True)
            shutil.rmtree(output_dir / "clients", ignore_errors=True)
        elif done.exists():
            logger.info("Feature statistics already done: %s", stats_file)
            return stats_file
    output_dir.mkdir(parents=True, exist_ok=True)
    inputs.write_text(json.dumps(signature, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    clients = load_clients(clients_jsonl)
    if not clients:
        raise ValueError(f"{clients_jsonl}: no clients")
    frontend = build_frontend(asr_config)
    client_files = []
    for client in tqdm(clients, desc="client feats stats", unit="client"):
        path = output_dir / "clients" / f"{safe_file_name(client.id)}.npz"
        if not path.exists():
            client_feats_stats(load_manifest_lazy(client.manifest), frontend).save(path)
        client_files.append(path)

    total = functools.reduce(operator.add, (FeatsStats.load(p) for p in client_files))
    total.save(stats_file)
    done.touch()
    logger.info(
        "Feature statistics of %d clients, %d frames, dim %d -> %s",
        len(clients), total.count, total.sum.shape[0], stats_file,
    )
    return stats_file
