"""Client-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018) with a maintained accountant.

Each round the server (a trusted aggregator) bounds every client's pseudo-gradient Δ_k to L2
norm C (the whole Δ, or each of its L tensors to C/√L), sums the bounded Δ_k with equal
weights, adds Gaussian noise N(0, σ²C²) once, and divides by the fixed cohort size K:

    Δ̄ = (Σ_k clip_C(Δ_k) + N(0, σ²C² I)) / K

The cohort is K clients drawn without replacement from N (the `uniform` sampler), so a round
is dp-accounting's `SampledWithoutReplacementDpEvent(N, K, Gaussian)` under the replace-one
relation, which only its RDP accountant supports. Replacing one client moves the clipped sum
by up to 2C, so the accountant's noise multiplier is σ/2. A round that does not count
(too few usable clients) is still charged: the ledger counts every sampled round, which can
only overstate ε.

The noise of round r is drawn from a generator seeded by (seed, r): a resumed run draws the
same noise for the same round, and the ledger is the number of sampled rounds, which the
checkpoint holds; so a resumed run reports the ε an uninterrupted one does.

Refused under DP: weights that depend on the clients' data (DGA, RL-DGA, FedAvg by size: one
client's loss or size moves every other weight, and no sensitivity bound is known for that),
BMUF and the robust rules (their output is not the bounded-sensitivity sum this noise
protects), samplers the accountant cannot model (`weighted`), and attacks.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable

import torch

from .config import FLConfig, PrivacyConfig
from .sampling import derive_seed
from .strategies.base import Aggregate, ClientResult, State

# Where target_epsilon's σ is searched. Above σ = 100 the noise (std 100·C) drowns the sum it
# protects (at most K·C) for any cohort trained here: a plan that needs more is refused.
SIGMA_BRACKET = (1e-2, 100.0)


def round_event(sigma: float, num_clients: int, per_round: int):
    """One round as dp-accounting sees it: K of N without replacement, then the Gaussian sum
    (std σC, replace-one sensitivity 2C: noise multiplier σ/2)."""
    import dp_accounting

    return dp_accounting.SampledWithoutReplacementDpEvent(num_clients, per_round, dp_accounting.GaussianDpEvent(sigma / 2))


@lru_cache(maxsize=4096)
def epsilon(sigma: float, num_clients: int, per_round: int, rounds: int, delta: float) -> float:
    """ε(δ) after `rounds` rounds, by dp-accounting's RDP accountant (replace-one)."""
    import dp_accounting

    if rounds == 0:
        return 0.0
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SelfComposedDpEvent(round_event(sigma, num_clients, per_round), rounds))
    return float(acc.get_epsilon(delta))


def calibrate_sigma(target_epsilon: float, num_clients: int, per_round: int, rounds: int, delta: float) -> float:
    """The smallest σ whose `rounds` rounds spend at most target_epsilon; an error if none in SIGMA_BRACKET does."""
    import dp_accounting

    lo, hi = SIGMA_BRACKET
    best = epsilon(hi, num_clients, per_round, rounds, delta)
    if best > target_epsilon:
        raise ValueError(
            f"privacy.target_epsilon={target_epsilon} cannot be met: even σ={hi:g} spends ε={best:.3g} over {rounds} rounds "
            f"of {per_round} of {num_clients} clients at δ={delta:.3g}. Plan fewer rounds or a larger federation."
        )
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE),
        lambda s: dp_accounting.SelfComposedDpEvent(round_event(s, num_clients, per_round), rounds),
        target_epsilon, delta, dp_accounting.ExplicitBracketInterval(lo, hi),
    ))


class ClientDP:
    """Clipping, noise and the privacy ledger of one run."""

    def __init__(self, conf: PrivacyConfig, fl: FLConfig, num_clients: int, seed: int) -> None:
        check_compatible(fl)
        self.conf, self.seed = conf, seed
        self.num_clients, self.per_round = num_clients, fl.clients_per_round
        self.delta = conf.delta if conf.delta is not None else 1.0 / num_clients**1.1
        self.sigma = conf.noise_multiplier if conf.noise_multiplier is not None else \
            calibrate_sigma(conf.target_epsilon, num_clients, self.per_round, fl.rounds, self.delta)

    def begin_round(self) -> None:
        self.clipped, self.seen = 0, 0

    def clip(self, result: ClientResult) -> ClientResult:
        """The result with its Δ bounded (counted when the bound changed it, a hint for choosing clip)."""
        delta, c = result.delta, self.conf.clip
        if self.conf.per_layer:
            bound = c / math.sqrt(len(delta))
            norms = {k: _norm([v]) for k, v in delta.items()}
            result.delta = {k: v * (bound / norms[k]) if norms[k] > bound else v for k, v in delta.items()}
            changed = any(n > bound for n in norms.values())
        else:
            norm = _norm(delta.values())
            changed = norm > c
            result.delta = {k: v * (c / norm) for k, v in delta.items()} if changed else delta
        self.clipped += changed
        self.seen += 1
        return result

    def privatize(self, aggregate: Aggregate, num_used: int, draw: int) -> Aggregate:
        """(mean · n + noise) / K: the strategy's equal-weight mean of the n clipped Δ back to their
        sum, the round's noise added once, and the fixed cohort size as denominator."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "dp_noise", draw))
        std = self.sigma * self.conf.clip
        out: State = {}
        for k, mean in aggregate.pseudo_grad.items():
            noise = torch.randn(mean.shape, generator=g, dtype=torch.float32) * std
            out[k] = (mean * num_used + noise) / self.per_round
        return Aggregate(out, {cid: 1.0 / self.per_round for cid in aggregate.weights})

    def report(self, draws: int) -> dict:
        """The ledger after `draws` sampled rounds, for metrics.jsonl, TensorBoard and RESULTS.md."""
        return {"epsilon": epsilon(self.sigma, self.num_clients, self.per_round, draws, self.delta), "delta": self.delta,
                "noise_multiplier": self.sigma, "sampling_rate": self.per_round / self.num_clients, "clip": self.conf.clip,
                "per_layer": self.conf.per_layer, "rounds_charged": draws, "clipped_fraction": self.clipped / max(self.seen, 1)}


def check_compatible(fl: FLConfig) -> None:
    """Refuse what the accountant cannot bound: data-dependent weights, the robust rules, other samplers."""
    s = fl.strategy
    if s.name not in ("fedavg", "fedprox") or s.weight_by != "uniform":
        raise ValueError(
            f"privacy needs the equal-weight sum (strategy fedavg or fedprox with weight_by: uniform), got strategy "
            f"{s.name} with weight_by {s.weight_by}: weights that depend on the clients' losses or sizes (DGA, RL-DGA, "
            "FedAvg by utterances) let one client move every other weight, with no sensitivity bound, and BMUF's and "
            "the robust rules' outputs are not the bounded sum the noise protects"
        )
    if fl.sampler != "uniform":
        raise ValueError(f"privacy needs sampler: uniform (K of N without replacement, which the accountant models), got {fl.sampler}")
    if fl.attack.name != "none":
        raise ValueError("privacy and attack together: the accountant assumes every client runs the clipped protocol")


def _norm(tensors: Iterable[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))
