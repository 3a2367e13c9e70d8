"""Dynamic Gradient Aggregation (Dimitriadis et al., 2020): a_k = softmax(−β·q_k).

Clients whose local training went badly (high loss, or unusual pseudo-gradient
statistics) get exponentially less weight. The softmax is computed while results
stream in (see `WeightedSum`), so the Δ_k are never all held at once.
"""
from __future__ import annotations

from .base import ClientResult, Strategy

QUANTITIES = ("train_loss", "grad_mean", "grad_rms", "grad_var", "uniform")


class DGA(Strategy):
    def __init__(self, weight_by: str = "train_loss", beta: float = 1.0) -> None:
        if weight_by not in QUANTITIES:
            raise ValueError(f"dga weight_by must be one of {QUANTITIES}, got '{weight_by}'")
        if beta < 0:
            raise ValueError(f"dga beta must be >= 0, got {beta}")
        self.weight_by = weight_by
        self.beta = float(beta)

    def score(self, result: ClientResult) -> float:
        if self.weight_by == "uniform":
            return 0.0
        return -self.beta * getattr(result, self.weight_by)
