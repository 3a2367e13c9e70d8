"""Which clients train in a round: seeded, reproducible, without replacement.

The choice for round r depends only on (seed, r), never on earlier draws, so a
resumed run samples exactly the clients an uninterrupted run would have.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

SAMPLERS = ("uniform", "weighted", "poisson")


def derive_seed(*parts) -> int:
    """A 63-bit seed from (seed, round, client, ...) that is stable across processes."""
    import hashlib

    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class ClientSampler:
    """`uniform` draws K clients without replacement. `weighted` draws each pick ∝ client size,
    without replacement: with several clients per round, inclusion is flatter than
    proportional (a large client can be drawn only once). `poisson` includes each client
    independently with probability q = K/N: the cohort size varies (it may be empty), as
    the Poisson-sampled Gaussian mechanism of DP accounting assumes."""

    def __init__(self, client_ids: Sequence[str], sizes: Sequence[int], per_round: int, mode: str = "uniform", seed: int = 0):
        if mode not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got '{mode}'")
        if not 1 <= per_round <= len(client_ids):
            raise ValueError(f"clients_per_round must be between 1 and the number of clients ({len(client_ids)}), got {per_round}")
        if len(set(client_ids)) != len(client_ids) or len(sizes) != len(client_ids):
            raise ValueError(
                f"client ids must be unique, one size each: {len(client_ids)} ids, {len(set(client_ids))} distinct, {len(sizes)} sizes"
            )
        self.client_ids = list(client_ids)
        sizes = np.asarray(sizes, dtype=np.float64)
        if mode == "weighted" and not (sizes > 0).all():
            raise ValueError("the weighted sampler needs every client size > 0 (a client of size 0 could never be drawn)")
        self.probs = sizes / sizes.sum() if mode == "weighted" else None
        self.per_round = per_round
        self.mode = mode
        self.seed = seed

    def sample(self, round_idx: int) -> list[str]:
        rng = np.random.default_rng(derive_seed(self.seed, "sample", round_idx))
        if self.mode == "poisson":
            keep = rng.random(len(self.client_ids)) < self.per_round / len(self.client_ids)
            return [cid for cid, k in zip(self.client_ids, keep) if k]
        idx = rng.choice(len(self.client_ids), size=self.per_round, replace=False, p=self.probs)
        return [self.client_ids[i] for i in idx]
