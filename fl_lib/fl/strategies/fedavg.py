"""FedAvg (McMahan et al., 2017): clients weighted by how much data they trained on."""
from __future__ import annotations

import math

from .base import ClientResult, Strategy

_WEIGHT_BY = ("num_utts", "num_frames")


class FedAvg(Strategy):
    def __init__(self, weight_by: str = "num_utts") -> None:
        if weight_by not in _WEIGHT_BY:
            raise ValueError(f"fedavg weight_by must be one of {_WEIGHT_BY}, got '{weight_by}'")
        self.weight_by = weight_by

    def score(self, result: ClientResult) -> float:
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
