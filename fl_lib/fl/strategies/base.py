"""The aggregation interface: client results in, one pseudo-gradient out.

Like Flower's `Strategy`, an algorithm is one subclass and never touches the
server loop. Aggregation is streaming: the server hands each client's result to
`add` as soon as it arrives and drops it, so server memory does not grow with
the number of clients per round.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch

from ..config import ServerOptimConfig

State = Dict[str, torch.Tensor]


@dataclass
class ClientResult:
    """What a client returns: its pseudo-gradient Δ_k = w_start − w_k and statistics."""

    client_id: str
    delta: State
    num_utts: int
    num_frames: int
    train_loss: float
    grad_mean: float
    grad_rms: float
    grad_var: float
    num_steps: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # time.process_time of the process that trained the client, during its training
    delta_finite: bool = True
    all_steps_invalid: bool = False  # ESPnet skipped every step (non-finite gradient norm): Δ = 0
    num_tokens: int = 0  # target tokens trained on

    @property
    def loss_per_token(self) -> float:
        """The local training loss per target token: a quality measure that does not grow with
        transcript length. ESPnet's loss (`length_normalized_loss: false`) is the mean over
        utterances of each utterance's summed loss, so the total is `train_loss · num_utts`."""
        if self.num_tokens <= 0:
            raise ValueError(f"client {self.client_id}: no target tokens counted, no loss per token")
        return self.train_loss * self.num_utts / self.num_tokens

    def is_finite(self) -> bool:
        stats = (self.train_loss, self.grad_mean, self.grad_rms, self.grad_var)
        return self.delta_finite and all(math.isfinite(v) for v in stats)


@dataclass
class Aggregate:
    """The round's pseudo-gradient and the normalized weight each client received."""

    pseudo_grad: State
    weights: Dict[str, float] = field(default_factory=dict)


class WeightedSum:
    """Streaming Σ_k a_k Δ_k / Σ_k a_k with a_k = exp(s_k), kept in log space.

    Scores may be log-weights of any range (DGA's −β·q_k, or log n_k): a running
    maximum rescales the accumulator (log-sum-exp), so no exp() overflows and no
    Δ_k is kept after it was added.
    """

    def __init__(self) -> None:
        self.acc: Optional[State] = None
        self.max_score = -math.inf
        self.norm = 0.0  # Σ exp(s_k − max_score)
        self.scores: Dict[str, float] = {}

    def add(self, client_id: str, score: float, delta: State) -> None:
        if not math.isfinite(score):
            raise ValueError(f"client {client_id}: aggregation score {score} is not finite")
        if score > self.max_score:
            rescale = math.exp(self.max_score - score) if self.acc is not None else 0.0
            if self.acc is not None:
                for t in self.acc.values():
                    t.mul_(rescale)
            self.norm *= rescale
            self.max_score = score
        w = math.exp(score - self.max_score)
        if self.acc is None:
            self.acc = {k: v.detach().to(torch.float32).mul(w) for k, v in delta.items()}
        else:
            for k, v in delta.items():
                self.acc[k].add_(v, alpha=w)
        self.norm += w
        self.scores[client_id] = score

    def all_reduce(self, like: State) -> None:
        """Combine every rank's sum into the sum over all ranks' clients, on every rank.

        The log-sum-exp normalizer is reduced first: the global maximum score (MAX),
        to which each rank rescales its sum and norm, then one SUM over the
        flattened accumulator and norm, so the weights are the single-process
        softmax. A rank without a usable client adds zeros shaped as `like`.
        """
        import torch.distributed as dist

        from ..distributed import all_gather_objects

        device = next(iter(like.values())).device
        top = torch.tensor([self.max_score], dtype=torch.float64, device=device)
        dist.all_reduce(top, dist.ReduceOp.MAX)
        global_max = float(top)
        if global_max == -math.inf:
            return  # no rank has a client: result() stays None
        keys = [k for k, v in like.items() if v.is_floating_point()]
        if self.acc is None:
            self.acc = {k: torch.zeros_like(like[k], dtype=torch.float32) for k in keys}
            scale = 0.0
        else:
            scale = math.exp(self.max_score - global_max)
        flat = torch.cat([self.acc[k].reshape(-1) for k in keys]).mul_(scale)
        norm = torch.tensor([self.norm * scale], dtype=torch.float64, device=device)
        dist.all_reduce(flat)
        dist.all_reduce(norm)
        offset = 0
        for k in keys:
            t = self.acc[k]
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        self.norm, self.max_score = float(norm), global_max
        for scores in all_gather_objects(self.scores):
            self.scores.update(scores)

    def result(self) -> Optional[Aggregate]:
        if self.acc is None:
            return None
        grad = {k: v.div_(self.norm) for k, v in self.acc.items()}
        weights = {cid: math.exp(s - self.max_score) / self.norm for cid, s in self.scores.items()}
        return Aggregate(grad, weights)


class Strategy(ABC):
    """Turns a round's client results into one pseudo-gradient for the server optimizer."""

    #: FedProx's μ; the client adds μ/2·‖w − w_global‖² to its loss when > 0.
    proximal_mu: float = 0.0
    #: Names of the trainable parameters, set by `bind`; every other key of Δ is a
    #: float buffer (BatchNorm statistics) or a frozen parameter.
    parameter_names: Optional[frozenset] = None
    #: Whether `aggregate` scores candidate updates on the server's held-out set (rl_dga): the
    #: server then sets `judge`, a function from a pseudo-gradient to the held-out loss of the
    #: model one server step on it would give.
    needs_judge: bool = False
    #: Whether the ranks of a torchrun job can each fold their clients and combine the sums with
    #: `all_reduce`; a strategy whose per-client scores need state only rank 0 keeps says no.
    ranks_reducible: bool = True

    def bind(self, parameter_names: Iterable[str]) -> None:
        """Tell the strategy which keys of Δ are trainable parameters (the server does, once)."""
        self.parameter_names = frozenset(parameter_names)

    def broadcast(self, global_state: State) -> State:
        """The weights clients start the round from (BMUF-Nesterov looks ahead)."""
        return global_state

    def begin_round(self) -> None:
        self._sum = WeightedSum()

    @abstractmethod
    def score(self, result: ClientResult) -> float:
        """Log-weight of a client: the aggregate is softmax(scores)-weighted."""

    def add(self, result: ClientResult) -> None:
        self._sum.add(result.client_id, self.score(result), result.delta)

    def aggregate(self) -> Optional[Aggregate]:
        """The weighted pseudo-gradient, or None if no client contributed."""
        return self._sum.result()

    def all_reduce(self, like: State) -> None:
        """Under torch.distributed: combine the ranks' round sums before `aggregate` (on every rank)."""
        self._sum.all_reduce(like)

    def check_server_optimizer(self, optim: ServerOptimConfig) -> None:
        """Reject server-optimizer settings (and LR schedules) that would silently change the algorithm."""

    def check_sampler(self, sampler: str) -> None:
        """Reject a client sampler that would bias this strategy's weights."""

    def min_clients(self) -> int:
        """The fewest usable clients a round needs to be aggregated at all (min_clients_per_round must allow for it)."""
        return 1

    def memory_bytes(self, k: int, d: int) -> int:
        """Bytes of a round's updates held at once for K = k clients of d floats; a streaming strategy holds one running sum: none."""
        return 0

    def check_memory(self, clients_per_round: int, num_floats: int) -> None:
        """Refuse a round whose aggregation would not fit in memory; a streaming strategy holds one sum: nothing to refuse."""

    def round_metrics(self) -> dict:
        """What the strategy decided in the last aggregated round, for metrics.jsonl and TensorBoard."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def require(value, name: str, strategy: str):
    if value is None:
        raise ValueError(f"strategy '{strategy}' needs '{name}'")
    return value


def reject(strategy: str, **unused) -> None:
    given = [k for k, v in unused.items() if v is not None]
    if given:
        raise ValueError(f"strategy '{strategy}' does not use: {', '.join(given)}")


def l2_norm(tensors: Iterable[torch.Tensor]) -> float:
    """The L2 norm of several tensors taken as one vector, summed in float64."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def weights_entropy(weights: List[float]) -> float:
    return -sum(w * math.log(w) for w in weights if w > 0)
