"""ESPnet training batches from a client's lazy Lhotse CutSet.

ESPnet's `Trainer.train_one_epoch` takes any iterator of `(utt_ids, batch)`, so
a Lhotse sampler + a map-style Dataset over CutSets replaces ESPnet's own
iterator factory without copying data into ESPnet's `dump/` layout. Batch layout
matches ESPnet's ASR collate function: float speech padded with 0, token ids
padded with -1 (the decoder's and CTC's ignore_id).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from lhotse import CutSet, load_manifest_lazy
from lhotse.cut import Cut
from lhotse.dataset import SimpleCutSampler

from fl_lib.data.tokenizer import Tokenizer

SAMPLING_RATE = 16000
IGNORE_ID = -1

Batch = tuple[list[str], dict[str, torch.Tensor]]


def load_speech(cut: Cut) -> np.ndarray:
    """Mono float32 samples in [-1, 1] at 16 kHz, the input ESPnet's frontends expect."""
    if cut.sampling_rate != SAMPLING_RATE:
        cut = cut.resample(SAMPLING_RATE)
    audio = cut.load_audio()
    if audio.ndim != 2 or audio.shape[0] != 1:
        raise ValueError(f"cut {cut.id}: expected mono audio, got shape {audio.shape}")
    return audio[0].astype(np.float32, copy=False)


class AudioCache:
    """Decoded audio of the cuts a client process has already read, up to `max_mb`.

    A client reads the same utterances in every local epoch and every round it is
    sampled; decoding them once is enough. The cache lives in the process that
    trains the client (its "device") and holds the very arrays `load_speech`
    returned, so cached and uncached batches are identical. Least recently used
    cuts are evicted first.
    """

    def __init__(self, max_mb: float) -> None:
        if max_mb <= 0:
            raise ValueError(f"audio cache size must be > 0 MB, got {max_mb}")
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def speech(self, cut: Cut) -> np.ndarray:
        audio = self.items.get(cut.id)
        if audio is not None:
            self.hits += 1
            self.items.move_to_end(cut.id)
            return audio
        self.misses += 1
        audio = load_speech(cut)  # batches copy it into their padded tensor, never change it
        self.items[cut.id] = audio
        self.bytes += audio.nbytes
        while self.bytes > self.max_bytes and len(self.items) > 1:
            self.bytes -= self.items.popitem(last=False)[1].nbytes
        return audio


def cut_text(cut: Cut) -> str:
    """The transcript of a single-utterance cut (one supervision, non-empty text)."""
    if len(cut.supervisions) != 1:
        raise ValueError(
            f"cut {cut.id}: expected exactly one supervision, got {len(cut.supervisions)}"
        )
    text = (cut.supervisions[0].text or "").strip()
    if not text:
        raise ValueError(f"cut {cut.id}: empty transcript")
    return text


def _pad(seqs: list[np.ndarray], value: float | int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=dtype)
    for i, seq in enumerate(seqs):
        out[i, : len(seq)] = torch.as_tensor(seq, dtype=dtype)
    return out


class AsrBatchDataset(torch.utils.data.Dataset):
    """Maps a CutSet (one sampler batch) to an ESPnet ASR batch, longest speech first.

    The order matters: ESPnet's RNN encoder packs the padded batch and needs
    descending lengths.
    """

    def __init__(self, tokenizer: Tokenizer, audio_cache: Optional[AudioCache] = None) -> None:
        self.tokenizer = tokenizer
        self.load = load_speech if audio_cache is None else audio_cache.speech

    def __getitem__(self, cuts: CutSet) -> Batch:
        items = []
        for cut in cuts:
            text = cut_text(cut)
            ids = self.tokenizer.encode(text)
            if not ids:
                raise ValueError(f"cut {cut.id}: transcript {text!r} encodes to no tokens")
            items.append((cut.id, self.load(cut), np.asarray(ids, dtype=np.int64)))
        if not items:
            raise ValueError("empty batch")
        items.sort(key=lambda item: (-len(item[1]), item[0]))
        speech = [item[1] for item in items]
        text = [item[2] for item in items]
        batch = {
            "speech": _pad(speech, 0.0, torch.float32),
            "speech_lengths": torch.tensor([len(s) for s in speech], dtype=torch.int64),
            "text": _pad(text, IGNORE_ID, torch.int64),
            "text_lengths": torch.tensor([len(t) for t in text], dtype=torch.int64),
        }
        return [item[0] for item in items], batch


def make_dataloader(
    cuts: CutSet | Path | str,
    tokenizer: Tokenizer,
    *,
    max_duration: float | None = None,
    max_cuts: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int = 0,
    audio_cache: Optional[AudioCache] = None,
) -> torch.utils.data.DataLoader:
    """Batches of `cuts` (a CutSet or a manifest path, read lazily) for `Trainer.train_one_epoch`.

    The batches depend only on (cuts, max_duration, max_cuts, shuffle, seed,
    epoch): Lhotse shuffles with `random.Random(seed + epoch)`, so a federated
    round can reproduce a client's batches from (seed, round). Each iteration
    over the returned loader yields the same batches. `audio_cache` (in-process
    only: not with `num_workers`) keeps decoded audio for the next epochs.
    """
    if audio_cache is not None and num_workers:
        raise ValueError("an audio cache lives in one process; use num_workers=0 with it")
    if max_duration is None and max_cuts is None:
        raise ValueError("set max_duration (seconds per batch) and/or max_cuts")
    if not isinstance(cuts, CutSet):
        cuts = load_manifest_lazy(cuts)
    # world_size=1: under torchrun Lhotse would split these cuts across ranks; a rank trains whole
    # clients (and rank 0 validates on all of dev), so each loader reads all of its cuts.
    sampler = SimpleCutSampler(
        cuts, max_duration=max_duration, max_cuts=max_cuts, shuffle=shuffle, seed=seed, world_size=1, rank=0
    )
    sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        AsrBatchDataset(tokenizer, audio_cache),
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
    )
