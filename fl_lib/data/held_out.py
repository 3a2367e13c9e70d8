"""A server-side held-out set carved from dev, disjoint from what model selection sees.

rl_dga picks between candidate updates by their loss on held-out data. If those
utterances also chose the best round, selection would be biased toward them, so
dev is split in two: a seeded sample of `num_utts` cuts for the server, and the
rest for per-round validation and model selection.
"""
from __future__ import annotations

import random
from pathlib import Path

from lhotse import CutSet, load_manifest_lazy

from ..atomic import atomic_path
from ..fl.sampling import derive_seed


def split_held_out(dev_cuts: Path, num_utts: int, seed: int, out_dir: Path) -> tuple[Path, Path]:
    """(held-out manifest, remaining dev manifest) under `out_dir`; the same inputs give the same split."""
    cuts = list(load_manifest_lazy(dev_cuts))  # a dev set: small by construction
    if not 1 <= num_utts < len(cuts):
        raise ValueError(
            f"held-out set of {num_utts} utterances cannot be carved from {dev_cuts} ({len(cuts)} cuts): "
            "it needs at least 1, and at least 1 must stay for model selection"
        )
    chosen = set(random.Random(derive_seed(seed, "held_out")).sample(range(len(cuts)), num_utts))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    held_out, rest = out_dir / "held_out.jsonl.gz", out_dir / "dev_model_selection.jsonl.gz"
    for path, keep in ((held_out, True), (rest, False)):
        with atomic_path(path) as tmp:
            CutSet.from_cuts(c for i, c in enumerate(cuts) if (i in chosen) == keep).to_file(tmp)
    return held_out, rest
