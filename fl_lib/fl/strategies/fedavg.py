"""FedAvg (McMahan et al., 2017): clients weighted by how much data they trained on.

With `sampler: weighted` a client is already drawn with probability ∝ its size;
weighting it by size again would make its effective weight ∝ n_k². That
combination is rejected: McMahan et al.'s unbiased estimator for size-weighted
sampling averages the sampled clients uniformly (`weight_by: uniform`).
"""
from __future__ import annotations

import math

from .base import ClientResult, Strategy

_WEIGHT_BY = ("num_utts", "num_frames", "uniform")


class FedAvg(Strategy):
    def __init__(self, weight_by: str = "num_utts") -> None:
        if weight_by not in _WEIGHT_BY:
            raise ValueError(f"fedavg weight_by must be one of {_WEIGHT_BY}, got '{weight_by}'")
        self.weight_by = weight_by

    def check_sampler(self, sampler: str) -> None:
        if sampler == "weighted" and self.weight_by != "uniform":
            raise ValueError(
                f"sampler 'weighted' already draws clients ∝ size; weighting them by {self.weight_by} again makes "
                "the effective weight ∝ size². Use strategy.weight_by=uniform with it (McMahan et al.'s unbiased "
                "estimator), or sampler=uniform"
            )

    def score(self, result: ClientResult) -> float:
        if self.weight_by == "uniform":
            return 0.0
        n = getattr(result, self.weight_by)
        if n <= 0:
            raise ValueError(f"client {result.client_id}: {self.weight_by} is {n}, cannot weight by it")
        return math.log(n)


class FedProx(FedAvg):
    """FedAvg aggregation; each client adds μ/2·‖w − w_global‖² once per local step."""

    def __init__(self, mu: float, weight_by: str = "num_utts") -> None:
        super().__init__(weight_by)
        if mu < 0:
            raise ValueError(f"fedprox mu must be >= 0, got {mu}")
        self.proximal_mu = float(mu)
