"""Atomic checkpoints of everything a federated run needs to continue bit-for-bit.

A checkpoint is written through `atomic_path`, so a `kill -9` at any moment
leaves either the previous round's or this round's.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path


def atomic_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_copy(src: Path, dst: Path) -> None:
    """Publish an already-serialized file under another name, atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
