"""Blockwise Model-Update Filtering (Chen & Huo, ICASSP 2016), the distributed-training baseline.

Per block (round) t, with w̄ the mean of the client models and b the broadcast model:
    G_t = w̄ − b,   Δ_t = η·Δ_{t−1} + ζ·G_t,   w_t = w_{t−1} + Δ_t
and with Nesterov-style block momentum the next block starts from w_t + η·Δ_t.
The strategy returns −Δ_t as pseudo-gradient, so a server SGD with lr 1 applies it.

Only trainable parameters get block momentum and the look-ahead. Float buffers
(BatchNorm's running mean and variance) are statistics, not weights: extrapolated
by η·Δ a running variance can go below zero, so they take the plain client mean.
"""
from __future__ import annotations

from typing import Optional

from ..config import ServerOptimConfig
from .base import Aggregate, ClientResult, State, Strategy


class BMUF(Strategy):
    def __init__(self, block_momentum: float, block_lr: float = 1.0, nesterov: bool = True) -> None:
        if not 0.0 <= block_momentum < 1.0:
            raise ValueError(f"bmuf block_momentum must be in [0, 1), got {block_momentum}")
        self.block_momentum = float(block_momentum)
        self.block_lr = float(block_lr)
        self.nesterov = bool(nesterov)
        self.momentum_buffer: Optional[State] = None  # Δ_{t−1}

    def check_server_optimizer(self, optim: ServerOptimConfig) -> None:
        """The server step must apply −Δ_t as is: any other optimizer, lr or schedule rescales the block update."""
        if optim.name != "sgd" or optim.lr != 1.0 or optim.momentum != 0.0 or optim.weight_decay != 0.0:
            raise ValueError(
                "bmuf applies its own block momentum and learning rate: use server_optim name=sgd lr=1.0 "
                f"momentum=0.0 weight_decay=0.0 (got {optim.name} lr={optim.lr} momentum={optim.momentum} "
                f"weight_decay={optim.weight_decay})"
            )
        schedule = optim.schedule
        if schedule.warmup_rounds or schedule.decay != "none":
            raise ValueError(
                "bmuf needs a constant server lr 1: server_optim.schedule would scale each block update "
                f"(got warmup_rounds={schedule.warmup_rounds} decay={schedule.decay}); tune strategy.block_lr instead"
            )

    def broadcast(self, global_state: State) -> State:
        if not self.nesterov or self.momentum_buffer is None:
            return global_state
        look_ahead = dict(global_state)
        for k, d in self.momentum_buffer.items():
            look_ahead[k] = global_state[k] + self.block_momentum * d
        return look_ahead

    def score(self, result: ClientResult) -> float:
        return 0.0  # w̄ is the plain mean of the client models

    def aggregate(self) -> Optional[Aggregate]:
        if self.parameter_names is None:
            raise RuntimeError("bmuf.bind(parameter_names) must be called first: buffers are averaged, not extrapolated")
        mean = super().aggregate()  # mean_k(b − w_k) = −G_t: the Δ_k were taken against b
        if mean is None:
            return None
        block, pseudo_grad = {}, {}
        for k, neg_g in mean.pseudo_grad.items():
            if k not in self.parameter_names:
                pseudo_grad[k] = neg_g  # buffers: the server moves them to the plain client mean
                continue
            d = -self.block_lr * neg_g
            if self.momentum_buffer is not None:
                d.add_(self.momentum_buffer[k], alpha=self.block_momentum)
            block[k] = d
            pseudo_grad[k] = -d
        self.momentum_buffer = {k: v.clone() for k, v in block.items()}
        return Aggregate(pseudo_grad, mean.weights)

    def state_dict(self) -> dict:
        return {"momentum_buffer": self.momentum_buffer}

    def load_state_dict(self, state: dict) -> None:
        self.momentum_buffer = state["momentum_buffer"]
