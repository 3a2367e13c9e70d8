"""Dynamic Gradient Aggregation (Dimitriadis et al., 2020): a_k = softmax(−β·q_k).

Clients whose local training went badly (high loss, or unusual pseudo-gradient
statistics) get exponentially less weight. The softmax is computed while results
stream in (see `WeightedSum`), so the Δ_k are never all held at once.

q_k must measure quality, not size: `loss_per_token` (the default) is the local
training loss per target token. `train_loss` is ESPnet's loss per utterance,
which grows with transcript length, so it down-weights speakers of long
sentences, not bad clients. The signed mean of Δ is no quantity: its weight would
depend on an arbitrary sign; RMS and variance of Δ are sign-free.
"""
from __future__ import annotations

from .base import ClientResult, Strategy

QUANTITIES = ("loss_per_token", "train_loss", "grad_rms", "grad_var", "uniform")


class DGA(Strategy):
    def __init__(self, weight_by: str = "loss_per_token", beta: float = 1.0) -> None:
        if weight_by == "grad_mean":
            raise ValueError("dga weight_by 'grad_mean' was removed: the signed mean of Δ weights clients by an "
                             "arbitrary sign; use grad_rms or grad_var, or loss_per_token")
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
