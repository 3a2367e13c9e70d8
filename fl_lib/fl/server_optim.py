"""Server optimizers that step on the aggregated pseudo-gradient, and their per-round LR schedules.

This is the hierarchical optimization of Dimitriadis et al.: clients run their own
optimizer locally; the server treats Σ a_k Δ_k as a gradient. SGD with lr 1 gives
FedAvg; momentum, Adam (FedAdam) and LAMB give adaptive server updates.
"""
from __future__ import annotations

import copy
from typing import Dict, Iterable

import torch

from .config import ScheduleConfig, ServerOptimConfig


class LAMB(torch.optim.Optimizer):
    """Layer-wise adaptive moments (You et al., 2020): an Adam step rescaled per tensor
    by the trust ratio ‖w‖ / ‖update‖, so layers of very different scale move alike.

    As in the paper (its φ clips the weight norm) and common implementations:
    - the trust ratio is bounded by `max_trust_ratio`: a tensor whose update is
      tiny next to its weights would otherwise take a step of any size;
    - one-dimensional tensors (biases, LayerNorm/BatchNorm scales and shifts) take
      the plain Adam step, with neither trust ratio nor weight decay: their norm
      says nothing about the layer's scale, and decaying a norm scale shrinks the
      layer's output rather than regularizing it.
    """

    def __init__(
        self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
        max_trust_ratio: float = 10.0,
    ):
        if lr <= 0:
            raise ValueError(f"LAMB lr must be > 0, got {lr}")
        if max_trust_ratio <= 0:
            raise ValueError(f"LAMB max_trust_ratio must be > 0, got {max_trust_ratio}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, max_trust_ratio=max_trust_ratio))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1 ** state["step"])
                v_hat = v / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                trust = 1.0
                if p.dim() > 1:  # weight matrices and kernels; biases and norm parameters are 1-D
                    if group["weight_decay"]:
                        update.add_(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm().item(), update.norm().item()
                    if w_norm > 0 and u_norm > 0:
                        trust = min(w_norm / u_norm, group["max_trust_ratio"])
                p.add_(update, alpha=-group["lr"] * trust)
        return loss


ADAM_BETAS = (0.9, 0.999)  # adam / lamb when server_optim.betas is not given
ADAM_EPS = 1e-8  # adam / lamb when server_optim.eps is not given


def build_server_optimizer(params: Iterable[torch.nn.Parameter], conf: ServerOptimConfig) -> torch.optim.Optimizer:
    """`conf` was validated when it was built: options of another optimizer never get here."""
    if conf.name == "sgd":
        return torch.optim.SGD(params, lr=conf.lr, momentum=conf.momentum, nesterov=conf.nesterov, weight_decay=conf.weight_decay)
    betas = tuple(ADAM_BETAS if conf.betas is None else conf.betas)
    eps = ADAM_EPS if conf.eps is None else conf.eps
    if conf.name == "adam":
        return torch.optim.Adam(params, lr=conf.lr, betas=betas, eps=eps, weight_decay=conf.weight_decay)
    if conf.name == "lamb":
        return LAMB(params, lr=conf.lr, betas=betas, eps=eps, weight_decay=conf.weight_decay)
    raise ValueError(f"unknown server_optim '{conf.name}'; choose sgd, adam or lamb")


def lr_factor(round_idx: int, conf: ScheduleConfig) -> float:
    """Multiplier of the base LR for 0-based round `round_idx`: linear warmup, then decay."""
    if round_idx < conf.warmup_rounds:
        return (round_idx + 1) / conf.warmup_rounds
    after = round_idx - conf.warmup_rounds
    if conf.decay == "step":
        return conf.gamma ** (after // conf.step_size)
    if conf.decay == "exponential":
        return conf.gamma**after
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, conf: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per round; `lr_factor(0)` applies to the first round. `conf` was
    validated when it was built, so a bad step_size or gamma never reaches round W."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda r: lr_factor(r, conf))


@torch.no_grad()
def trial_step(
    optimizer: torch.optim.Optimizer, params: Dict[str, torch.nn.Parameter], state: Dict[str, torch.Tensor],
    pseudo_grad: Dict[str, torch.Tensor],
) -> Dict[str, torch.Tensor]:
    """The model state one server step on `pseudo_grad` would give, computed on copies.

    A candidate update (rl_dga's) is judged by the model it would really produce, Adam
    moments and the scheduled lr included. `optimizer` must hold exactly `params` (in
    order) in one group; it, `params`, `state` and `pseudo_grad` are left untouched, so
    the real step happens once, later. Float buffers move by the plain aggregate, as
    in the server's own step.
    """
    scratch = {name: torch.nn.Parameter(p.detach().clone()) for name, p in params.items()}
    copy_ = type(optimizer)(list(scratch.values()), **optimizer.defaults)
    copy_.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # loading alone would share the moment tensors
    out = dict(state)
    for name, g in pseudo_grad.items():
        if name in scratch:
            scratch[name].grad = g.clone()
        else:
            out[name] = state[name] - g
    copy_.step()
    for name, p in scratch.items():
        out[name] = p.detach()
    return out
