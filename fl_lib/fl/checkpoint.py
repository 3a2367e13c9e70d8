"""Atomic checkpoints of everything a federated run (or the centralized reference) needs to continue bit-for-bit.

A checkpoint is written through `atomic_path`, so a `kill -9` at any moment
leaves either the previous round's or this round's. The one it replaces is kept as
checkpoint.prev.pth: a checkpoint damaged after it was written (a bad disk, a copy
cut short) costs one round, not the run. It is read back with `weights_only=True`:
a checkpoint.pth found in an output directory may come from anyone, and a full
unpickler would run whatever code it names.
"""
from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..atomic import atomic_path
from .config import with_defaults

logger = logging.getLogger(__name__)

# Besides tensors and plain containers, a checkpoint holds numpy's RNG state: a
# ('MT19937', uint32 array, ...) tuple. These are the globals that array's pickle names.
_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
NUMPY_RNG_GLOBALS = [_multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
CHECKPOINT_KEYS = ("round", "draws", "model", "server_optimizer", "scheduler", "strategy", "rng", "best_score",
                   "fl_config", "run_identity")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and why."""


class DamagedCheckpointError(CheckpointError):
    """A file whose bytes are not a readable torch file (truncated, overwritten), as opposed
    to one that reads but is refused (foreign objects, missing keys)."""

    def __init__(self, path: Path, reason: str, advice: str) -> None:
        self.damage = f"{path}: unreadable, truncated or corrupted ({reason})"
        super().__init__(f"{self.damage}. {advice}")


def atomic_save(obj: Any, path: Path, owner: str = "") -> None:
    with atomic_path(path, owner) as tmp:
        torch.save(obj, tmp)


def atomic_copy(src: Path, dst: Path, owner: str = "") -> None:
    """Publish an already-serialized file under another name, atomically."""
    with atomic_path(dst, owner) as tmp:
        shutil.copyfile(src, tmp)


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def load_checkpoint(path: Path, keys: Sequence[str] = CHECKPOINT_KEYS, writer: str = "fl_train") -> dict:
    """A checkpoint of `writer` holding `keys` (fl_train's by default), loaded weights-only:
    tensors, plain containers and numpy's RNG state, nothing else."""
    current = path.with_name(path.name.replace(".prev.", "."))  # the pair to remove, whichever of the two this is
    state = _load_weights_only(
        path, f"a checkpoint of {writer}", NUMPY_RNG_GLOBALS,
        if_damaged=f"Remove {current.name} and {previous_path(current).name} to start over (the <N>round.pth and "
                   "<N>epoch.pth files hold weights only and cannot resume a run).",
        if_refused="If you did not write this file, remove it; otherwise start over in another --output_dir.",
    )
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of {writer}: it lacks {', '.join(missing)}")
    return state


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A model state_dict file (<N>round.pth, valid.acc.best.pth, ...), loaded weights-only, with
    an error that names the file instead of torch's unpickler trace."""
    state = _load_weights_only(
        path, "a model file", [],
        if_damaged="Decode another model (--inference_model), or rerun the training that wrote it.",
        if_refused="If you did not write this file, remove it.",
    )
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a model state_dict (a mapping of parameter names to tensors)")
    return state


def _load_weights_only(path: Path, what: str, allowed: list, if_damaged: str, if_refused: str) -> Any:
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = unpickler_reason(e)
        if not names_a_global(reason):  # a damaged pickle stream, not a refused object
            raise DamagedCheckpointError(path, reason, if_damaged) from None
        raise CheckpointError(
            f"{path}: refused, it is not loaded: it holds something {what} never holds ({reason}), "
            f"and unpickling that could run code. {if_refused}"
        ) from None
    except (RuntimeError, EOFError, ValueError, KeyError) as e:  # a truncated or overwritten zip (UnicodeDecodeError is a ValueError)
        raise DamagedCheckpointError(path, f"{type(e).__name__}: {e}", if_damaged) from e


def resume_differences(saved: dict, defaults: dict, current: dict, may_change: Sequence[str],
                       saved_identity: dict, identity: dict) -> list[str]:
    """The config keys and run-identity entries in which a checkpoint's experiment differs from
    this one. Keys added since the checkpoint was written count at their `defaults`; the
    `may_change` keys do not count."""
    saved, current = with_defaults(saved, defaults), dict(current)
    for key in may_change:
        saved.pop(key, None), current.pop(key)
    differs = [key for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    return differs + [key for key, value in identity.items() if saved_identity.get(key) != value]


def previous_path(path: Path) -> Path:
    """Where `save_checkpoint` keeps the checkpoint that `path` replaced: checkpoint.prev.pth."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(state: dict, path: Path, owner: str) -> None:
    """Write `path` atomically and keep the checkpoint it replaces: twice a checkpoint's disk,
    three times while the new one is being written.

    The old one is moved aside only once the new one is on disk: a failed write (ENOSPC) leaves
    `path` as it was, and a kill between the two renames leaves only the previous checkpoint,
    which `load_resumable` takes (that round is trained again)."""
    with atomic_path(path, owner) as tmp:
        torch.save(state, tmp)
        if path.exists():
            path.rename(previous_path(path))


def load_resumable(path: Path, keys: Sequence[str] = CHECKPOINT_KEYS, writer: str = "fl_train") -> Optional[tuple[dict, Path]]:
    """The state to resume from and the file it came from: `path`, or the previous checkpoint
    when `path` is damaged (moved aside to checkpoint.damaged.pth for inspection) or missing
    after a kill mid-save. None when there is neither; a `CheckpointError` when neither loads.

    Only damage falls back: a checkpoint refused for what it holds stops the run."""
    previous = previous_path(path)
    if not path.exists():
        if not previous.exists():
            return None
        logger.warning(f"{path} is missing and {previous.name} is there (a run killed while saving?): resuming from {previous}")
        return load_checkpoint(previous, keys, writer), previous
    try:
        return load_checkpoint(path, keys, writer), path
    except DamagedCheckpointError as e:
        if not previous.exists():
            raise
        state = load_checkpoint(previous, keys, writer)
        damaged = path.with_name(f"{path.stem}.damaged{path.suffix}")
        path.rename(damaged)
        logger.error(f"{e.damage}; kept as {damaged.name}, resuming from the previous checkpoint, {previous}")
        return state, previous


def names_a_global(reason: str) -> bool:
    """Whether torch's weights-only unpickler refused a class or function (else the stream itself is damaged)."""
    return "global" in reason.lower() or "allowlist" in reason.lower()


def unpickler_reason(error: Exception) -> str:
    """The line of torch's weights-only error that says what was refused, without its advice to load unsafely."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1]
    reason = next((line.strip() for line in text.splitlines() if line.strip()), "not a weights-only pickle")
    return reason.split(" was not an allowed global")[0]


def truncate_metrics(path: Path, key: str, done: int, owner: str) -> list[dict]:
    """Keep the metrics rows whose `key` (round or epoch) is at most `done`: on resume, a row
    logged but not checkpointed before a crash is dropped. Returns the kept rows.

    Rewritten atomically: checkpoint pruning ranks rows by this file, so a crash mid-rewrite
    must leave the old file, not a short one. A last line that does not parse is the tail of
    an append cut short, and is dropped with a warning; any other is an error."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keep, rows = [], []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}, line {i + 1}: not JSON, and not the last line: edited or corrupted") from None
            logger.warning(f"{path}: dropped its last line, cut short by a crash: {line[:80]!r}")
            continue
        if row[key] <= done:
            keep.append(line)
            rows.append(row)
    with atomic_path(path, owner) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    return rows
