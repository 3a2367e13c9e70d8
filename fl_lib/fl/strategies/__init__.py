"""Aggregation strategies, chosen by `strategy.name` in the federated config."""
from __future__ import annotations

from ..config import StrategyConfig
from .base import Aggregate, ClientResult, Strategy, reject, require
from .bmuf import BMUF
from .dga import DGA
from .fedavg import FedAvg, FedProx
from .rl_dga import RLDGA
from .robust import CenteredClipping, GeometricMedian, Median, MultiKrum, NormBounding, RobustRule, TrimmedMean

# rl_dga's own keys; every other strategy rejects them.
RL_KEYS = (
    "held_out_utts", "temperature", "explore_std", "explore_decay", "explore_min", "agent_hidden", "agent_lr",
    "memory_size", "batch_rounds", "updates_per_round",
)
# The robust rules' keys (strategies/robust.py): each rule takes its own and the shared ones.
ROBUST = {
    "median": (Median, ()),
    "trimmed_mean": (TrimmedMean, ("trim_fraction",)),
    "krum": (MultiKrum, ("num_byzantine", "num_selected")),
    "geometric_median": (GeometricMedian, ("tolerance", "max_iterations")),
    "centered_clipping": (CenteredClipping, ("clip_radius", "clip_iterations")),
    "norm_bounding": (NormBounding, ()),
}
ROBUST_SHARED = ("bucket_size", "memory_limit_mb")
ROBUST_REQUIRED = ("trim_fraction", "num_byzantine", "clip_radius")


def build_strategy(conf: StrategyConfig, seed: int = 0) -> Strategy:
    """Instantiate the configured strategy; keys it does not use are an error. `seed` (the run's)
    seeds rl_dga's agent and exploration."""
    name = conf.name
    if name != "rl_dga":
        reject(name, **{k: getattr(conf, k) for k in RL_KEYS})
    if name in ROBUST:
        cls, own = ROBUST[name]
        reject(name, **{k: getattr(conf, k) for k in ("weight_by", "beta", "block_momentum", "block_lr", "nesterov", "mu")},
               **{k: getattr(conf, k) for _, keys in ROBUST.values() for k in keys if k not in own})
        kwargs = {k: getattr(conf, k) for k in (*own, *ROBUST_SHARED) if getattr(conf, k) is not None}
        for k in own:
            if k in ROBUST_REQUIRED:
                require(getattr(conf, k), k, name)
        return cls(seed=seed, **kwargs)
    reject(name, **{k: getattr(conf, k) for _, keys in ROBUST.values() for k in (*keys, *ROBUST_SHARED)})
    if name == "fedavg":
        reject(name, beta=conf.beta, block_momentum=conf.block_momentum, block_lr=conf.block_lr, nesterov=conf.nesterov, mu=conf.mu)
        return FedAvg(weight_by=conf.weight_by or "num_utts")
    if name == "fedprox":
        reject(name, beta=conf.beta, block_momentum=conf.block_momentum, block_lr=conf.block_lr, nesterov=conf.nesterov)
        return FedProx(mu=require(conf.mu, "mu", name), weight_by=conf.weight_by or "num_utts")
    if name in ("dga", "rl_dga"):
        reject(name, block_momentum=conf.block_momentum, block_lr=conf.block_lr, nesterov=conf.nesterov, mu=conf.mu)
        weight_by = conf.weight_by or "loss_per_token"
        if weight_by == "uniform":
            if conf.beta is not None:
                raise ValueError(f"strategy '{name}' with weight_by 'uniform' does not use: beta (equal weights: nothing to scale)")
            beta = 1.0
        else:
            beta = require(conf.beta, "beta", name)
        if name == "dga":
            return DGA(weight_by=weight_by, beta=beta)
        held_out = require(conf.held_out_utts, "held_out_utts", name)
        if not (isinstance(held_out, int) and held_out >= 1):
            raise ValueError(f"rl_dga held_out_utts must be an integer >= 1 (an empty held-out set scores nothing), got {held_out}")
        agent = {k: getattr(conf, k) for k in RL_KEYS[1:] if getattr(conf, k) is not None}
        return RLDGA(weight_by=weight_by, beta=beta, seed=seed, **agent)
    if name == "bmuf":
        reject(name, weight_by=conf.weight_by, beta=conf.beta, mu=conf.mu)
        return BMUF(
            block_momentum=require(conf.block_momentum, "block_momentum", name),
            block_lr=1.0 if conf.block_lr is None else conf.block_lr,
            nesterov=True if conf.nesterov is None else conf.nesterov,
        )
    raise ValueError(f"unknown strategy '{name}'; choose fedavg, fedprox, dga, rl_dga, bmuf or one of {', '.join(ROBUST)}")


__all__ = ["Aggregate", "ClientResult", "Strategy", "FedAvg", "FedProx", "DGA", "RLDGA", "BMUF", "RobustRule", "Median",
           "TrimmedMean", "MultiKrum", "GeometricMedian", "CenteredClipping", "NormBounding", "build_strategy"]
