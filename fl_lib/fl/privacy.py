"""Client-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018) with a maintained accountant.

Each round the server (a trusted aggregator) bounds every client's pseudo-gradient Δ_k to L2
norm C (the whole Δ, or each of its L tensors to C/√L), sums the bounded Δ_k with equal
weights, adds Gaussian noise N(0, σ²C²) once, and divides by the fixed cohort size K:

    Δ̄ = (Σ_k clip_C(Δ_k) + N(0, σ²C² I)) / K

Two samplers, each with the dp-accounting event that models it:
- `uniform`: K of N without replacement, `SampledWithoutReplacementDpEvent(N, K, Gaussian)`
  under the replace-one relation, which only the RDP accountant supports. Replacing one
  client moves the clipped sum by up to 2C, so the accountant's noise multiplier is σ/2.
  A round that does not count (too few usable clients) is still charged: the ledger counts
  every sampled round, which can only overstate ε.
- `poisson`: each client with probability q = K/N, `PoissonSampledDpEvent(q, Gaussian(σ))`
  under add-or-remove (sensitivity C), by RDP or PLD. The denominator stays the expected K,
  and every round releases its noised sum whatever the cohort's size, empty included:
  skipping a small cohort would reveal its size, which the accountant does not charge for.

With `target_quantile` γ the clip adapts (Andrew et al., NeurIPS 2021): each round also
releases the count of clients whose Δ was within the clip, noised with std σ_b, and
C ← C · exp(−η_C (b̃ − γ)), b̃ = (count + N(0, σ_b²)) / K. The two releases are one Gaussian
mechanism for the ledger: with z_sum and z_count their noise-to-sensitivity ratios,
z⁻² = z_sum⁻² + z_count⁻² must equal the configured (or calibrated) σ's z, so the sum's
noise is raised to pay for the count. The count's sensitivity is 1; the sum's is C
(add-or-remove) or 2C (replace-one).

The noise of round r is drawn from a generator seeded by (seed, r): a resumed run draws the
same noise for the same round, and the ledger is the number of sampled rounds, which the
checkpoint holds with σ and the adaptive clip; so a resumed run reports the ε an
uninterrupted one does. This is a simulation: anyone who knows the seed can regenerate the
noise and remove it, so ε holds only while the seed stays secret, and a deployment must
draw its noise from a secret source. ε covers the sequence of models; `metrics.jsonl` also
keeps non-private diagnostics of the simulation (client ids, losses, the exact clipped
fraction), which a deployment would not release.

Δ is what local training changes (`client.trained_entries`): the trainable parameters and
BatchNorm's running statistics. Constants (the mel filterbank, the feature normalization) are not
in it, so they are not noised either. A running variance that the noise pushed below 0 (it made
the eval-mode BatchNorm give NaN) is set to 0 after the server step, a post-processing that
costs no privacy; the count is `clamped_running_var` in metrics.jsonl.

Refused under DP: weights that depend on the clients' data (DGA, RL-DGA, FedAvg by size: one
client's loss or size moves every other weight, and no sensitivity bound is known for that),
BMUF and the robust rules (their output is not the bounded-sensitivity sum this noise
protects), samplers the accountant cannot model (`weighted`), and attacks.
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import Optional

import torch

from .config import FLConfig, PrivacyConfig
from .sampling import derive_seed
from .strategies.base import Aggregate, ClientResult, State, l2_norm

# Where target_epsilon's σ is searched. Above σ = 100 the noise (std 100·C) drowns the sum it
# protects (at most K·C) for any cohort trained here: a plan that needs more is refused.
SIGMA_BRACKET = (1e-2, 100.0)
logger = logging.getLogger(__name__)


ACCOUNTANTS = {"uniform": ("rdp",), "poisson": ("rdp", "pld")}  # what dp-accounting can do for each sampler


def round_event(sigma: float, num_clients: int, per_round: int, sampler: str):
    """One round as dp-accounting sees it (module docstring): the sampling, then the Gaussian sum of std σC."""
    import dp_accounting

    if sampler == "poisson":
        return dp_accounting.PoissonSampledDpEvent(per_round / num_clients, dp_accounting.GaussianDpEvent(sigma))
    return dp_accounting.SampledWithoutReplacementDpEvent(num_clients, per_round, dp_accounting.GaussianDpEvent(sigma / 2))


def make_accountant(sampler: str, accountant: str):
    import dp_accounting

    if accountant not in ACCOUNTANTS[sampler]:
        raise ValueError(f"privacy.accountant {accountant} cannot account for sampler {sampler}: use {' or '.join(ACCOUNTANTS[sampler])}")
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant()
    relation = dp_accounting.NeighboringRelation.REPLACE_ONE if sampler == "uniform" else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)


@lru_cache(maxsize=64)
def one_round_rdp(sigma: float, num_clients: int, per_round: int, sampler: str):
    """(orders, RDP at each order) of one round. The costly part of the RDP ledger (0.4-2 s for
    a small σ sampled without replacement), so it is computed once per σ and sampler."""
    acc = make_accountant(sampler, "rdp")
    acc.compose(round_event(sigma, num_clients, per_round, sampler))
    return acc.orders, acc.rdp


@lru_cache(maxsize=4096)
def epsilon(sigma: float, num_clients: int, per_round: int, rounds: int, delta: float,
            sampler: str = "uniform", accountant: str = "rdp") -> float:
    """ε(δ) after `rounds` rounds of the sampler's event, by the named dp-accounting accountant."""
    import dp_accounting

    if rounds == 0:
        return 0.0
    if accountant == "rdp":
        # RDP composes additively: T rounds cost T times one round's RDP, as RdpAccountant
        # composes a SelfComposedDpEvent; only the conversion to ε(δ) is per round count.
        orders, rdp = one_round_rdp(sigma, num_clients, per_round, sampler)
        return float(dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon(orders, rounds * rdp, delta)[0])
    acc = make_accountant(sampler, accountant)
    acc.compose(dp_accounting.SelfComposedDpEvent(round_event(sigma, num_clients, per_round, sampler), rounds))
    return float(acc.get_epsilon(delta))


def calibrate_sigma(target_epsilon: float, num_clients: int, per_round: int, rounds: int, delta: float,
                    sampler: str = "uniform", accountant: str = "rdp") -> float:
    """The smallest σ whose `rounds` rounds spend at most target_epsilon; an error if none in SIGMA_BRACKET does."""
    import dp_accounting

    lo, hi = SIGMA_BRACKET
    best = epsilon(hi, num_clients, per_round, rounds, delta, sampler, accountant)
    if best > target_epsilon:
        raise ValueError(
            f"privacy.target_epsilon={target_epsilon} cannot be met: even σ={hi:g} spends ε={best:.3g} over {rounds} rounds "
            f"of {per_round} of {num_clients} clients at δ={delta:.3g}. Plan fewer rounds or a larger federation."
        )
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(sampler, accountant),
        lambda s: dp_accounting.SelfComposedDpEvent(round_event(s, num_clients, per_round, sampler), rounds),
        target_epsilon, delta, dp_accounting.ExplicitBracketInterval(lo, hi),
    ))


class ClientDP:
    """Clipping, noise and the privacy ledger of one run."""

    def __init__(self, conf: PrivacyConfig, fl: FLConfig, num_clients: int, seed: int) -> None:
        check_compatible(fl)
        self.conf, self.seed = conf, seed
        self.num_clients, self.per_round, self.sampler = num_clients, fl.clients_per_round, fl.sampler
        make_accountant(self.sampler, conf.accountant)  # refuses a pair dp-accounting cannot do, before training
        self.delta = conf.delta if conf.delta is not None else 1.0 / num_clients**1.1
        self.sigma = conf.noise_multiplier if conf.noise_multiplier is not None else \
            calibrate_sigma(conf.target_epsilon, num_clients, self.per_round, fl.rounds, self.delta, self.sampler, conf.accountant)
        self.target_epsilon = conf.target_epsilon
        self.clip_norm = conf.clip  # C_t: changes each round under adaptive clipping
        self.adaptive = conf.target_quantile is not None
        self.clip_lr = 0.2 if conf.clip_lr is None else conf.clip_lr
        self.count_noise = self.per_round / 20 if conf.count_noise is None else conf.count_noise
        self.sum_sigma = self._sum_sigma() if self.adaptive else self.sigma
        self.last_quantile: Optional[float] = None
        self.over_target = False
        self.clamped = 0  # running-variance coordinates set to 0 after the last step
        self.begin_round()

    def _sum_sigma(self) -> float:
        """The sum's noise multiplier (std / C) that, with the count's σ_b, spends what σ alone would."""
        scale = 2.0 if self.sampler == "uniform" else 1.0  # the sum's sensitivity in units of C
        z = self.sigma / scale
        if self.count_noise <= z:
            raise ValueError(
                f"privacy.count_noise={self.count_noise:g} must exceed {z:.4g} (σ={self.sigma:.4g} in the accountant's units): "
                "the count alone would spend the whole budget. Raise count_noise or lower the noise multiplier"
            )
        return scale * (z**-2 - self.count_noise**-2) ** -0.5
    def begin_round(self) -> None:
        self.clipped, self.seen = 0, 0

    def merge_counts(self, per_rank: list) -> None:
        """Under torchrun: every rank's (clipped, seen), summed, so rank 0 releases the round's count."""
        self.clipped, self.seen = (sum(c for c, _ in per_rank), sum(n for _, n in per_rank))

    def bound(self, result: ClientResult) -> ClientResult:
        """The result with its Δ bounded, counted as clipped when its whole-model norm exceeds C.

        Per layer too, the count is of the whole norm: with L tensors, some tensor of almost every
        update exceeds C/√L, and counting those drove the adaptive clip up without end (σ = 0.03,
        100 rounds: 2.6 to 14,157, the model lost; bench/README.md, privacy.sh)."""
        delta, c = result.delta, self.clip_norm
        norm = l2_norm(delta.values())
        if self.conf.per_layer:
            bound = c / math.sqrt(len(delta))
            norms = {k: l2_norm([v]) for k, v in delta.items()}
            result.delta = {k: v * (bound / norms[k]) if norms[k] > bound else v for k, v in delta.items()}
        elif norm > c:
            result.delta = {k: v * (c / norm) for k, v in delta.items()}
        self.clipped += norm > c
        self.seen += 1
        return result

    def privatize(self, aggregate: Optional[Aggregate], num_used: int, draw: int, like: State) -> Aggregate:
        """(mean · n + noise) / K: the strategy's equal-weight mean of the n clipped Δ back to their
        sum, the round's noise added once, and the fixed (or expected) cohort size as denominator.
        No usable client (a Poisson cohort can be empty): the noise alone, shaped as `like`'s floats."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "dp_noise", draw))
        std = self.sum_sigma * self.clip_norm
        if aggregate is None:
            aggregate = Aggregate({k: torch.zeros_like(v, dtype=torch.float32) for k, v in like.items() if v.is_floating_point()})
        out: State = {}
        for k, mean in aggregate.pseudo_grad.items():
            noise = torch.randn(mean.shape, generator=g, dtype=torch.float32).to(mean.device) * std  # drawn on the CPU: the same on any device
            out[k] = (mean * num_used + noise) / self.per_round
        if self.adaptive:
            self._adapt_clip(draw)
        return Aggregate(out, {cid: 1.0 / self.per_round for cid in aggregate.weights})

    @torch.no_grad()
    def project(self, state: State) -> None:
        """Running variances below 0 (the noise's doing) set to 0, in place, after the server step."""
        self.clamped = 0
        for k, v in state.items():
            if k.endswith("running_var"):
                self.clamped += int((v < 0).sum())
                v.clamp_(min=0.0)

    def _adapt_clip(self, draw: int) -> None:
        """C ← C · exp(−η_C (b̃ − γ)), b̃ the noised fraction of this round's clients within C."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "dp_count", draw))
        within = (self.seen - self.clipped) + float(torch.randn((), generator=g, dtype=torch.float64)) * self.count_noise
        self.last_quantile = within / self.per_round
        self.clip_norm *= math.exp(-self.clip_lr * (self.last_quantile - self.conf.target_quantile))

    def state_dict(self) -> dict:
        return {"clip": self.clip_norm, "sigma": self.sigma, "sum_sigma": self.sum_sigma}

    def load_state_dict(self, state: dict) -> None:
        """The clip, and the σ the rounds run so far were charged at: a target_epsilon run resumed
        with more `rounds` keeps its σ (and says what ε the longer plan spends) rather than
        charging the past rounds at a σ solved for the new plan."""
        if state["sigma"] != self.sigma:
            logger.warning(f"privacy: resuming with the checkpoint's σ={state['sigma']:.4g}, not {self.sigma:.4g} "
                           "(solved again for the current `rounds`): the rounds run so far were noised with it")
        self.clip_norm, self.sigma, self.sum_sigma = state["clip"], state["sigma"], state["sum_sigma"]

    def report(self, draws: int) -> dict:
        """The ledger after `draws` sampled rounds, for metrics.jsonl, TensorBoard and RESULTS.md."""
        eps = epsilon(self.sigma, self.num_clients, self.per_round, draws, self.delta, self.sampler, self.conf.accountant)
        if self.target_epsilon is not None and eps > self.target_epsilon and not self.over_target:
            self.over_target = True
            logger.warning(f"privacy: ε={eps:.3g} after {draws} sampled rounds exceeds target_epsilon={self.target_epsilon} "
                           "(σ was solved for `rounds` rounds; rounds that did not count or more rounds were charged too)")
        return {"epsilon": eps, "delta": self.delta, "noise_multiplier": self.sigma, "sampling_rate": self.per_round / self.num_clients,
                "sampler": self.sampler, "accountant": self.conf.accountant, "next_clip": self.clip_norm, "per_layer": self.conf.per_layer,
                "rounds_charged": draws, "clipped_fraction": self.clipped / max(self.seen, 1), "clamped_running_var": self.clamped,
                **({"sum_noise_multiplier": self.sum_sigma, "count_noise": self.count_noise, "noised_unclipped_fraction": self.last_quantile}
                   if self.adaptive else {})}


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
    if fl.sampler not in ACCOUNTANTS:
        raise ValueError(f"privacy needs sampler uniform (K of N without replacement) or poisson, which the accountant "
                         f"models, got {fl.sampler}")
    if fl.sampler == "poisson" and fl.min_clients_per_round != 1:
        raise ValueError("privacy with sampler poisson releases every round's noised sum, whatever the cohort's size: "
                         f"min_clients_per_round={fl.min_clients_per_round} would skip small cohorts and reveal their size")
    if fl.attack.name != "none":
        raise ValueError("privacy and attack together: the accountant assumes every client runs the clipped protocol")


def plan(population: int, cohort: int, rounds: int, delta: float, sigma: float) -> dict:
    """ε of a planned deployment (population N, cohorts of K, T rounds, noise multiplier σ) by
    every sampler/accountant pair dp-accounting supports, side by side. The noise per coordinate
    of the averaged update is σC/K: a plan that keeps a dev run's σ₀C/K₀ scales σ with K."""
    out = {"population": population, "cohort": cohort, "rounds": rounds, "delta": delta, "noise_multiplier": sigma,
           "noise_std_over_clip": sigma / cohort}
    for sampler, accountants in ACCOUNTANTS.items():
        for accountant in accountants:
            out[f"epsilon_{sampler}_{accountant}"] = epsilon(sigma, population, cohort, rounds, delta, sampler, accountant)
    return out
