"""Byzantine clients for robustness experiments: forged updates, applied outside the strategies.

In each round `attack.per_round` of the sampled clients (drawn from the run's seed and the
round, independently of the sampler) train as usual, then send a forged Δ instead of their
own. The server holds the attackers' results back until every honest result of the round
has been seen (the omniscient attacks forge from the honest updates' statistics, which are
accumulated while the honest results stream into the strategy), then hands the forged ones
to the strategy like any other. Which clients attacked is logged in metrics.jsonl
(`attacked`); the strategies never see it.

- sign_flip: −Δ_own;
- scale: c·Δ_own (c = 10, 100: model replacement);
- gaussian: a random direction with the honest updates' mean norm;
- alie (Baruch et al., 2019, "A little is enough"): μ − z·σ per coordinate, μ and σ (ddof 1)
  over the round's honest updates, z given or z_max = Φ⁻¹((K − s)/K), s = ⌊K/2 + 1⌋ − f;
- ipm (Xie et al., 2020, inner-product manipulation): −ε·μ;
- min_max / min_sum (Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the Byzantine"):
  μ + γ·p, p = −σ (or −μ/‖μ‖, −sign μ), with the largest γ whose forged update is no farther
  from the honest ones than they are from each other: its largest distance to one of them
  (min_max), or its sum of squared distances to all of them (min_sum), at most the largest
  such figure of an honest update. The paper finds γ by bisection; here it is the exact
  root of the quadratic in γ. They keep the round's honest updates, since the distances need
  each of them, not only their sums: (K − f)·d float64, and about three times that while forging
  (the stacked updates, their deviations from the mean, and their squares), once a round. That
  peak, with the K x d rows a robust strategy holds in the same round, is checked against
  `attack.memory_limit_mb` before any training.

Every attacker of a round sends the same forged update under alie, ipm, min_max and min_sum (they collude);
the statistics a strategy reads from a result (grad_mean, grad_rms, grad_var) are those of
the forged Δ, while its reported loss and sizes stay its own.
"""
from __future__ import annotations

import math
from dataclasses import replace
from statistics import NormalDist
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from .config import AttackConfig
from .sampling import derive_seed
from .strategies.base import ClientResult, State, l2_norm

HONEST_NEEDED = {"gaussian": 1, "alie": 2, "ipm": 1, "min_max": 2, "min_sum": 2}  # honest updates each forges from
NEEDS_HONEST = tuple(HONEST_NEEDED)  # forged from the round's honest updates
KEEPS_HONEST = ("min_max", "min_sum")  # forged from every honest update itself, not only from sums


def alie_z(k: int, f: int) -> float:
    """Baruch et al.'s z_max: the largest shift that still leaves the forged value inside the
    range a majority-based rule accepts, for K clients of which f attack. It is 0 (the honest
    mean itself) at f = ⌊K/2 + 1⌋ − K/2, e.g. f = 1 of K = 8, and undefined for f > ⌊K/2⌋."""
    s = math.floor(k / 2 + 1) - f
    if s < 1:
        raise ValueError(f"ALIE's z_max needs f <= K/2 attackers (K={k}, f={f}); set attack.z")
    return NormalDist().inv_cdf((k - s) / k)


def min_max_gamma(honest: torch.Tensor, direction: torch.Tensor, rule: str) -> float:
    """The largest γ ≥ 0 for which μ + γ·p stays within the honest updates' own spread.

    honest: (n, d) float64; p = direction. With a_i = μ − h_i and D the squared pairwise
    distances of the honest updates:
    - min_max: max_i ‖a_i + γp‖² ≤ max_ij D_ij. Each ‖a_i + γp‖² is a convex quadratic that
      starts at or below the bound (‖a_i‖ ≤ max_j ‖h_j − h_i‖), so γ is the smallest of their
      upper roots;
    - min_sum: Σ_i ‖a_i + γp‖² ≤ max_i Σ_j D_ij. Σ_i a_i = 0 removes the linear term:
      γ² = (bound − Σ_i ‖a_i‖²) / (n‖p‖²)."""
    pp = float(direction @ direction)
    if pp == 0.0:  # all honest updates equal (std), or a zero mean (unit, sign): γ moves nothing
        return 0.0
    a = honest.mean(0, keepdim=True) - honest
    sq = (a * a).sum(1)
    dist = torch.cdist(honest, honest, compute_mode="donot_use_mm_for_euclid_dist").square()  # mm: cancellation
    if rule == "min_max":
        b = a @ direction
        roots = (-b + (b * b - pp * (sq - dist.max())).clamp(min=0).sqrt()) / pp
        return float(roots.min())
    return math.sqrt(max(float(dist.sum(1).max() - sq.sum()), 0.0) / (len(honest) * pp))


class Attack:
    def __init__(self, conf: AttackConfig, seed: int) -> None:
        self.conf = conf
        self.seed = seed
        self.parameter_names: Optional[frozenset] = None

    @property
    def active(self) -> bool:
        return self.conf.name != "none"

    def bind(self, parameter_names: Iterable[str]) -> None:
        """The trainable parameters, over which a forged result's gradient statistics are taken."""
        self.parameter_names = frozenset(parameter_names)

    def check_memory(self, clients_per_round: int, num_floats: int, alongside_bytes: int = 0) -> None:
        """Refuse, before any training, a K whose honest updates min_max / min_sum would keep and
        forge from (three float64 copies at the peak), added to the `alongside_bytes` the strategy
        holds in the same round (a robust rule's K x d rows), exceed attack.memory_limit_mb."""
        if self.conf.name not in KEEPS_HONEST:
            return
        limit = 4096.0 if self.conf.memory_limit_mb is None else self.conf.memory_limit_mb
        own = 3 * max(clients_per_round - self.conf.per_round, 0) * num_floats * 8 / 2**20
        need = own + alongside_bytes / 2**20
        if need > limit:
            held = f" with the strategy's {alongside_bytes / 2**20:,.0f} MB of rows" if alongside_bytes else ""
            raise ValueError(f"attack '{self.conf.name}' keeps every honest update of a round: K={clients_per_round} clients "
                             f"(f={self.conf.per_round}) of {num_floats:,} floats need about {need:,.0f} MB while forging"
                             f"{held}, above attack.memory_limit_mb={limit:g}. Lower clients_per_round, or raise the limit")

    def min_clients(self) -> int:
        """Usable clients a round needs: the attackers and the honest updates they forge from."""
        return self.conf.per_round + HONEST_NEEDED.get(self.conf.name, 0) if self.active else 1

    def choose(self, sampled: Sequence[str], draw: int) -> list[str]:
        """The attackers among the `draw`-th round's sampled clients: f of them (all, if fewer were
        sampled because drop_failing_clients left some out), seeded by round."""
        if not self.active:
            return []
        rng = np.random.default_rng(derive_seed(self.seed, "attack", draw))
        return sorted(rng.choice(sorted(sampled), size=min(self.conf.per_round, len(sampled)), replace=False).tolist())

    # -- the round's honest statistics ----------------------------------------------
    def begin_round(self) -> None:
        self._n, self._sum, self._sq, self._norms, self._honest = 0, None, None, 0.0, []
        self._keys: Optional[list] = None  # KEEPS_HONEST: the entry order every flattened Δ follows
        self._forged: Optional[torch.Tensor] = None  # KEEPS_HONEST: the round's forged vector, one for all attackers

    def observe(self, result: ClientResult) -> None:
        """Accumulate an honest result's Δ: float64 sums, or for min_max / min_sum the flattened Δ itself."""
        if self.conf.name not in NEEDS_HONEST:
            return
        if self.conf.name in KEEPS_HONEST:
            if self._keys is None:
                self._keys = sorted(result.delta)
            elif set(result.delta) != set(self._keys):
                raise ValueError(f"client {result.client_id}'s update has other entries than the round's first honest one")
            self._honest.append(torch.cat([result.delta[k].detach().double().reshape(-1).cpu() for k in self._keys]))
            self._n += 1
            return
        if self._sum is None:
            self._sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in result.delta.items()}
            self._sq = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in result.delta.items()}
        sq_norm = 0.0
        for k, v in result.delta.items():
            v = v.double()
            self._sum[k] += v
            self._sq[k] += v * v
            sq_norm += float((v * v).sum())
        self._n += 1
        self._norms += math.sqrt(sq_norm)

    def forge(self, result: ClientResult, draw: int, cohort_size: int) -> ClientResult:
        """The attacker's result with its forged Δ, after every honest result of the round was observed."""
        name = self.conf.name
        if name == "sign_flip":
            delta = {k: -v for k, v in result.delta.items()}
        elif name == "scale":
            delta = {k: self.conf.scale * v for k, v in result.delta.items()}
        else:
            delta = self._forge_from_honest(result, draw, cohort_size)
        return replace(result, delta=delta, **self._gradient_stats(delta))

    def _forge_from_honest(self, result: ClientResult, draw: int, cohort_size: int) -> State:
        need = HONEST_NEEDED[self.conf.name]
        if self._n < need:
            raise ValueError(f"attack '{self.conf.name}' forges from the round's honest updates: it needs at least {need}, "
                             f"round {draw + 1} has {self._n} (lower attack.per_round or raise clients_per_round)")
        if self.conf.name in KEEPS_HONEST:
            return self._min_max(result.delta)
        mean = {k: s / self._n for k, s in self._sum.items()}
        if self.conf.name == "ipm":
            return {k: (-self.conf.epsilon * m).to(result.delta[k].dtype) for k, m in mean.items()}
        if self.conf.name == "alie":
            z = alie_z(cohort_size, self.conf.per_round) if self.conf.z is None else self.conf.z
            std = {k: ((self._sq[k] - self._n * mean[k] ** 2).clamp(min=0) / (self._n - 1)).sqrt() for k in mean}
            return {k: (mean[k] - z * std[k]).to(result.delta[k].dtype) for k in mean}
        # gaussian: a direction drawn per (round, client), scaled to the honest mean norm
        g = torch.Generator().manual_seed(derive_seed(self.seed, "gaussian", draw, result.client_id))
        noise = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in result.delta.items()}
        norm = l2_norm(noise.values())
        target = self._norms / self._n
        return {k: (n * (target / norm)).to(result.delta[k].dtype).to(result.delta[k].device) for k, n in noise.items()}

    def _min_max(self, like: State) -> State:
        if set(like) != set(self._keys):
            raise ValueError(f"the attacker's update has other entries than the honest ones: {sorted(like)} vs {self._keys}")
        if self._forged is None:  # the attackers collude: one forged vector a round
            honest = torch.stack(self._honest)
            self._honest = []  # the stack holds them now
            mean = honest.mean(0)
            direction = {"std": lambda: -honest.std(0, unbiased=True), "sign": lambda: -mean.sign(),
                         "unit": lambda: -mean / mean.norm().clamp(min=1e-30)}[self.conf.direction or "std"]()
            self._forged = mean + min_max_gamma(honest, direction, self.conf.name) * direction
        out, start = {}, 0
        for k in self._keys:  # the order observe() flattened in
            v = like[k]
            out[k] = self._forged[start:start + v.numel()].reshape(v.shape).to(v.dtype).to(v.device)
            start += v.numel()
        return {k: out[k] for k in like}

    def _gradient_stats(self, delta: State) -> dict:
        """grad_mean, grad_rms and grad_var of Δ over the trainable parameters, as the client computes them."""
        d = torch.cat([delta[k].double().reshape(-1) for k in delta if k in self.parameter_names])
        mean, ms = float(d.mean()), float(d.square().mean())
        return {"grad_mean": mean, "grad_rms": math.sqrt(ms), "grad_var": max(ms - mean * mean, 0.0),
                "delta_finite": bool(torch.isfinite(d).all())}
