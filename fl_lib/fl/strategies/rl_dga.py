"""RL-based dynamic gradient aggregation (the seed paper's second method): an agent learns the weights.

Each round, one small network shared by all clients scores each client from its
feature vector (permutation-equivariant, so any K and any order work). The
agent's candidate is a = softmax(q/τ + ξ), ξ ~ N(0, σ_t²) per client, with σ_t
annealed over rounds. The softmax-DGA aggregate (`dga`, same `weight_by` and β)
is the reference. The server scores both candidates on a held-out set carved out of
dev (`held_out_utts`). Model selection uses what is left of dev, so the two never mix.

Learning rule: a contextual bandit whose reward model is linear in the action,

    r ≈ Σ_k (a_k − a_k^ref) · q_θ(z_k).

This is the first-order expansion of the held-out loss around the reference:
L(w − g_a) − L(w − g_ref) ≈ −Σ_k (a_k − a_k^ref)·∇L·Δ_k. So q_θ(z_k) learns what
moving weight onto client k is worth. It is regressed on the observed rewards
(MSE, Adam) over minibatches of past rounds from a replay memory. The policy
softmax(q/τ) is the best action under that model with an entropy bonus:
argmax_a Σ_k a_k q_k + τ·H(a). The output layer starts at zero, so round 1 scores
are all zero: uniform weights plus exploration noise.

Sign convention: r = (L_ref − L_agent) / L_ref, clipped to [−1, 1], on the held-out
loss. r > 0 means the agent's candidate has the lower loss. It is always a loss,
never an accuracy, so the sign cannot flip with the metric (FLUTE's did). q_k > 0
means more weight on k lowers the held-out loss, so it raises k's score.

Apply rule: the candidate with the lower held-out loss (a tie goes to the
reference). Both losses are computed for the reward anyway, and this way the
agent's exploration never makes a round worse on held-out data than DGA would.

Isolation: the server builds each candidate model with `trial_step`, on copies of
its parameters and optimizer state. Only the chosen pseudo-gradient goes through
the one real server step.

Memory, O(1) in K: a client's Δ is dropped when its result has been added, so its
score must be known at that moment. As DGA keeps one running weighted sum, this
strategy keeps two, the agent's and the reference's. So the features use only the
client's own result and what the federation knew before the round:
- They are standardized by running estimates (EMA over rounds) of each feature's
  round mean and within-round variance. This round's own statistics are only known
  after the last Δ is gone.
- cos(Δ_k, g_{t−1}), where g_{t−1} is the update applied in the previous round,
  stands in for cos with this round's mean Δ, which is unknown until then. It is 0
  in round 1.
The K × 6 feature floats of the round are kept for learning.

Edge cases:
- A round with one client applies that client's Δ, with no trial and no experience.
- A client with a non-finite feature is an error that names it. The server has
  already dropped clients with a non-finite loss or Δ.
- K may change from round to round.
- The held-out set is never empty: `held_out_utts` >= 1 is checked when the config
  is built, and `held_out_loss` raises on an empty set.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch

from ..sampling import derive_seed
from .base import Aggregate, ClientResult, State, Strategy, WeightedSum, l2_norm
from .dga import DGA

FEATURES = ("loss_per_token", "log_utts", "log_norm", "mean_over_rms", "log_var", "cos_prev_update")
NORM_MOMENTUM = 0.9  # running feature statistics: weight of the past after the first 1/(1−m) rounds
MIN_STD = 0.1  # a feature that was constant so far must not blow up a later small difference
MAX_Z = 5.0  # standardized features are clipped: one wild client cannot saturate the network


class Scorer(torch.nn.Module):
    """q_θ: one client's standardized features to its value; shared by all clients."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(len(FEATURES), hidden), torch.nn.Tanh(),
            torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
            torch.nn.Linear(hidden, 1),
        )
        torch.nn.init.zeros_(self.net[-1].weight)  # round 1: all values 0, uniform weights
        torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(-1)


def relative_improvement(loss_agent: float, loss_reference: float) -> Optional[float]:
    """The reward: (L_ref − L_agent) / L_ref in [−1, 1]. A non-finite loss loses to a finite
    one (−1 or +1); if both are non-finite there is nothing to learn (None)."""
    fa, fr = math.isfinite(loss_agent), math.isfinite(loss_reference)
    if not fa and not fr:
        return None
    if not fa:
        return -1.0
    if not fr:
        return 1.0
    r = (loss_reference - loss_agent) / max(abs(loss_reference), 1e-12)
    return max(-1.0, min(1.0, r))


class RLDGA(Strategy):
    needs_judge = True
    # One process only: a client's features use g_{t−1} and the running feature statistics, which
    # only rank 0 keeps, and the K × 6 features of the round would have to be gathered to it.
    ranks_reducible = False

    def __init__(
        self, *, weight_by: str, beta: float, seed: int, temperature: float = 0.05, explore_std: float = 1.0,
        explore_decay: float = 0.95, explore_min: float = 0.1, agent_hidden: int = 32, agent_lr: float = 0.01,
        memory_size: int = 1000, batch_rounds: int = 16, updates_per_round: int = 4,
    ) -> None:
        checks = {
            "temperature": temperature > 0, "explore_std": explore_std >= 0, "explore_decay": 0 < explore_decay <= 1,
            "explore_min": 0 <= explore_min <= explore_std, "agent_hidden": agent_hidden >= 1, "agent_lr": agent_lr > 0,
            "memory_size": memory_size >= 1, "batch_rounds": batch_rounds >= 1, "updates_per_round": updates_per_round >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"rl_dga: invalid {', '.join(bad)} (need temperature > 0, 0 <= explore_min <= explore_std, "
                "0 < explore_decay <= 1, agent_hidden, memory_size, batch_rounds, updates_per_round >= 1, agent_lr > 0)"
            )
        self.reference = DGA(weight_by, beta)
        self.seed = seed
        self.temperature = float(temperature)
        self.explore_std, self.explore_decay, self.explore_min = float(explore_std), float(explore_decay), float(explore_min)
        self.memory_size, self.batch_rounds, self.updates_per_round = memory_size, batch_rounds, updates_per_round
        with torch.random.fork_rng(devices=[]):  # the agent's init leaves the run's RNG streams alone
            torch.manual_seed(derive_seed(seed, "rl_dga", "init") % 2**32)
            self.scorer = Scorer(agent_hidden)
        self.agent_optimizer = torch.optim.Adam(self.scorer.parameters(), lr=agent_lr)
        self.memory: List[dict] = []  # {"z": (K, F), "da": (K,) a − a_ref, "reward": float}, oldest first
        self.feature_mean = torch.zeros(len(FEATURES), dtype=torch.float64)
        self.feature_var = torch.ones(len(FEATURES), dtype=torch.float64)
        self.mean_rounds = self.var_rounds = 0
        self.rounds_seen = 0  # aggregated rounds: the exploration schedule and the seeds
        self.prev_update: Optional[State] = None  # g_{t−1}, trainable parameters only
        #: Held-out loss of the model one server step on a pseudo-gradient would give; bound by the server.
        self.judge: Optional[Callable[[State], float]] = None
        self.last_metrics: dict = {}

    # -- one round -----------------------------------------------------------
    @property
    def current_explore_std(self) -> float:
        return max(self.explore_min, self.explore_std * self.explore_decay**self.rounds_seen)

    def begin_round(self) -> None:
        if self.parameter_names is None:
            raise RuntimeError("rl_dga.bind(parameter_names) must be called first: ‖Δ‖ and cos are over parameters")
        self._agent_sum, self._ref_sum = WeightedSum(), WeightedSum()
        self._ids: List[str] = []
        self._raw: List[torch.Tensor] = []
        self._z: List[torch.Tensor] = []
        self._prev_norm = l2_norm(self.prev_update.values()) if self.prev_update is not None else 0.0

    def features(self, result: ClientResult) -> torch.Tensor:
        """The raw feature vector of one client (see FEATURES); ValueError if one is not finite."""
        sq = dot = 0.0
        for name in self.parameter_names:
            d = result.delta[name].double()
            sq += float(d.square().sum())
            if self.prev_update is not None:
                dot += float((d * self.prev_update[name].double()).sum())
        norm = math.sqrt(sq)
        cos = dot / (norm * self._prev_norm) if norm > 0 and self._prev_norm > 0 else 0.0
        raw = [
            result.loss_per_token,
            math.log(result.num_utts) if result.num_utts > 0 else math.nan,
            math.log(norm + 1e-30),
            result.grad_mean / result.grad_rms if result.grad_rms > 0 else 0.0,
            math.log(result.grad_var + 1e-30),
            cos,
        ]
        bad = [f"{n}={v}" for n, v in zip(FEATURES, raw) if not math.isfinite(v)]
        if bad:
            raise ValueError(
                f"client {result.client_id}: rl_dga feature(s) not finite: {', '.join(bad)} (the server drops clients "
                "with a non-finite loss or pseudo-gradient before aggregation; a client with no utterances cannot be scored)"
            )
        return torch.tensor(raw, dtype=torch.float64)

    def standardize(self, raw: torch.Tensor) -> torch.Tensor:
        std = self.feature_var.sqrt().clamp(min=MIN_STD)
        return ((raw - self.feature_mean) / std).clamp(-MAX_Z, MAX_Z).float()

    def score(self, result: ClientResult) -> float:
        """The agent's exploring score. The noise is seeded by (seed, round, client):
        it does not depend on the order in which results arrive."""
        raw = self.features(result)
        z = self.standardize(raw)
        with torch.no_grad():
            q = float(self.scorer(z.unsqueeze(0))[0])
        g = torch.Generator().manual_seed(derive_seed(self.seed, "explore", self.rounds_seen, result.client_id))
        noise = self.current_explore_std * float(torch.randn((), generator=g, dtype=torch.float64))
        self._raw.append(raw)
        self._z.append(z)
        return q / self.temperature + noise

    def add(self, result: ClientResult) -> None:
        self._agent_sum.add(result.client_id, self.score(result), result.delta)
        self._ref_sum.add(result.client_id, self.reference.score(result), result.delta)
        self._ids.append(result.client_id)

    def aggregate(self) -> Optional[Aggregate]:
        agent, reference = self._agent_sum.result(), self._ref_sum.result()
        if agent is None:
            return None
        metrics = {
            "explore_std": self.current_explore_std,
            "agent_weights": {c: agent.weights[c] for c in self._ids},
        }
        chosen = reference
        if len(self._ids) == 1:  # one client: both candidates are its Δ; nothing to compare or learn
            metrics["applied"] = "single_client"
        else:
            if self.judge is None:
                raise RuntimeError("rl_dga needs the server's held-out judge: set strategy.judge before aggregating")
            loss_agent, loss_ref = self.judge(agent.pseudo_grad), self.judge(reference.pseudo_grad)
            reward = relative_improvement(loss_agent, loss_ref)
            metrics.update(held_out_loss_agent=loss_agent, held_out_loss_reference=loss_ref, reward=reward)
            if reward is not None:
                da = torch.tensor([agent.weights[c] - reference.weights[c] for c in self._ids])
                self.memory.append({"z": torch.stack(self._z), "da": da, "reward": reward})
                del self.memory[: -self.memory_size]
                metrics["agent_loss"] = self._learn()
                if reward > 0:
                    chosen = agent
            metrics["applied"] = "agent" if chosen is agent else "reference"
        self._update_statistics(torch.stack(self._raw))
        self.prev_update = {k: chosen.pseudo_grad[k].detach().clone() for k in self.parameter_names}
        self.rounds_seen += 1
        self.last_metrics = metrics
        return chosen

    def _learn(self) -> float:
        """`updates_per_round` Adam steps on the reward model's MSE over replayed rounds; the mean loss."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "replay", self.rounds_seen))
        losses = []
        for _ in range(self.updates_per_round):
            picks = torch.randint(len(self.memory), (min(self.batch_rounds, len(self.memory)),), generator=g).tolist()
            rounds = [self.memory[i] for i in picks]
            z = torch.cat([m["z"] for m in rounds])
            da = torch.cat([m["da"] for m in rounds])
            segment = torch.cat([torch.full((len(m["da"]),), i) for i, m in enumerate(rounds)])
            predicted = torch.zeros(len(rounds)).index_add(0, segment, da * self.scorer(z))
            loss = (predicted - torch.tensor([m["reward"] for m in rounds])).square().mean()
            self.agent_optimizer.zero_grad()
            loss.backward()
            self.agent_optimizer.step()
            losses.append(loss.item())
        return sum(losses) / len(losses)

    def _update_statistics(self, raw: torch.Tensor) -> None:
        """Fold this round's feature mean (and, with K ≥ 2, within-round variance) into the running
        estimates: a plain average over the first rounds, then an EMA."""
        self.mean_rounds += 1
        rate = max(1 - NORM_MOMENTUM, 1 / self.mean_rounds)
        self.feature_mean += rate * (raw.mean(0) - self.feature_mean)
        if len(raw) >= 2:
            self.var_rounds += 1
            rate = max(1 - NORM_MOMENTUM, 1 / self.var_rounds)
            self.feature_var += rate * (raw.var(0, unbiased=False) - self.feature_var)

    def round_metrics(self) -> dict:
        return self.last_metrics

    # -- checkpoint ----------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "scorer": self.scorer.state_dict(),
            "agent_optimizer": self.agent_optimizer.state_dict(),
            "memory": self.memory,
            "feature_mean": self.feature_mean,
            "feature_var": self.feature_var,
            "mean_rounds": self.mean_rounds,
            "var_rounds": self.var_rounds,
            "rounds_seen": self.rounds_seen,
            "prev_update": self.prev_update,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scorer.load_state_dict(state["scorer"])
        self.agent_optimizer.load_state_dict(state["agent_optimizer"])
        self.memory = list(state["memory"])
        self.feature_mean, self.feature_var = state["feature_mean"].clone(), state["feature_var"].clone()
        self.mean_rounds, self.var_rounds = state["mean_rounds"], state["var_rounds"]
        self.rounds_seen = state["rounds_seen"]
        self.prev_update = state["prev_update"]
