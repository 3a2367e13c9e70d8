"""Aggregation strategies, chosen by `strategy.name` in the federated config."""
from __future__ import annotations

from ..config import StrategyConfig
from .base import Aggregate, ClientResult, Strategy, reject, require
from .bmuf import BMUF
from .dga import DGA
from .fedavg import FedAvg, FedProx


def build_strategy(conf: StrategyConfig) -> Strategy:
    """Instantiate the configured strategy; keys it does not use are an error."""
    name = conf.name
    if name == "fedavg":
        reject(name, beta=conf.beta, block_momentum=conf.block_momentum, block_lr=conf.block_lr, nesterov=conf.nesterov, mu=conf.mu)
        return FedAvg(weight_by=conf.weight_by or "num_utts")
    if name == "fedprox":
        reject(name, beta=conf.beta, block_momentum=conf.block_momentum, block_lr=conf.block_lr, nesterov=conf.nesterov)
        return FedProx(mu=require(conf.mu, "mu", name), weight_by=conf.weight_by or "num_utts")
    if name == "dga":
        reject(name, block_momentum=conf.block_momentum, block_lr=conf.block_lr, nesterov=conf.nesterov, mu=conf.mu)
        weight_by = conf.weight_by or "loss_per_token"
        if weight_by == "uniform":
            if conf.beta is not None:
                raise ValueError("strategy 'dga' with weight_by 'uniform' does not use: beta (equal weights: nothing to scale)")
            return DGA(weight_by=weight_by)
        return DGA(weight_by=weight_by, beta=require(conf.beta, "beta", name))
    if name == "bmuf":
        reject(name, weight_by=conf.weight_by, beta=conf.beta, mu=conf.mu)
        return BMUF(
            block_momentum=require(conf.block_momentum, "block_momentum", name),
            block_lr=1.0 if conf.block_lr is None else conf.block_lr,
            nesterov=True if conf.nesterov is None else conf.nesterov,
        )
    raise ValueError(f"unknown strategy '{name}'; choose fedavg, fedprox, dga or bmuf")


__all__ = ["Aggregate", "ClientResult", "Strategy", "FedAvg", "FedProx", "DGA", "BMUF", "build_strategy"]
