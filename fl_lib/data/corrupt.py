"""Clients with bad labels, for experiments on robust aggregation (data poisoning).

A corrupted client keeps its audio and every transcript keeps its length in words:
- shuffle: its words are permuted across its own utterances, so its vocabulary and word
  counts stay the same and nothing but the audio-text pairing gives it away (the
  low-quality clients that DGA is meant to down-weight);
- random: each word is drawn uniformly from the whole federation's vocabulary, so the
  labels carry no information about the audio at all.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from lhotse import CutSet, load_manifest_lazy

from ..fl.sampling import derive_seed
from .clients import ClientInfo, load_clients, safe_file_name

logger = logging.getLogger(__name__)


MODES = ("shuffle", "random")


def shuffle_client_words(cuts_path: Path, output_path: Path, seed: int) -> Path:
    """Rewrite a client's manifest with its words permuted across its utterances."""
    cuts = list(load_manifest_lazy(cuts_path))  # one client: small by construction
    words = [w for cut in cuts for w in cut.supervisions[0].text.split()]
    random.Random(seed).shuffle(words)
    return _write_words(cuts, words, output_path)


def random_client_words(cuts_path: Path, output_path: Path, seed: int, vocabulary: Sequence[str]) -> Path:
    """Rewrite a client's manifest with every word drawn uniformly from `vocabulary`."""
    cuts = list(load_manifest_lazy(cuts_path))
    rng = random.Random(seed)
    words = [rng.choice(vocabulary) for cut in cuts for _ in cut.supervisions[0].text.split()]
    return _write_words(cuts, words, output_path)


def _write_words(cuts: list, words: list[str], output_path: Path) -> Path:
    """The cuts with their first supervision's words replaced, in order, by `words`."""
    out, pos = [], 0
    for cut in cuts:
        sup = cut.supervisions[0]
        n = len(sup.text.split())
        out.append(replace(cut, supervisions=[replace(sup, text=" ".join(words[pos : pos + n]))] + cut.supervisions[1:]))
        pos += n
    output_path.parent.mkdir(parents=True, exist_ok=True)
    CutSet.from_cuts(out).to_file(output_path)
    return output_path


def corrupt_clients(clients_jsonl: Path, output_dir: Path, num_corrupted: int, seed: int, mode: str = "shuffle") -> Path:
    """Copy a client listing with `num_corrupted` seeded-random clients' transcripts corrupted (`mode`).

    Writes `output_dir/clients.jsonl` (other clients point at their original
    manifests) and `output_dir/corrupted.txt` naming the corrupted clients.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    clients = load_clients(clients_jsonl)
    if not 0 <= num_corrupted <= len(clients):
        raise ValueError(f"cannot corrupt {num_corrupted} of {len(clients)} clients")
    chosen = set(random.Random(seed).sample([c.id for c in clients], num_corrupted))
    vocabulary = sorted({w for c in clients for cut in load_manifest_lazy(c.manifest) for w in cut.supervisions[0].text.split()}) \
        if mode == "random" else []
    output_dir = Path(output_dir)
    listing: list[ClientInfo] = []
    for c in clients:
        if c.id in chosen:
            path = output_dir / "cuts" / f"{safe_file_name(c.id)}.jsonl.gz"
            manifest = (shuffle_client_words(c.manifest, path, seed) if mode == "shuffle"  # each client's own words
                        else random_client_words(c.manifest, path, derive_seed(seed, "random_words", c.id), vocabulary))
            c = replace(c, manifest=manifest.resolve())
        listing.append(c)
    _write_listing(listing, output_dir / "clients.jsonl")
    (output_dir / "corrupted.txt").write_text("".join(f"{cid}\n" for cid in sorted(chosen)))
    logger.info(f"corrupted ({mode}) {len(chosen)} of {len(clients)} clients ({', '.join(sorted(chosen))}) -> {output_dir}")
    return output_dir / "clients.jsonl"


def _write_listing(clients: Sequence[ClientInfo], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for c in clients:
            f.write(json.dumps({"id": c.id, "num_cuts": c.num_cuts, "duration": c.duration, "manifest": str(Path(c.manifest).resolve())}) + "\n")
