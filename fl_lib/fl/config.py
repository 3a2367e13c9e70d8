"""Typed federated-training configuration, read from YAML and overridable by `key=value`.

Every key maps to a dataclass field. An unknown key is an error: an option that
silently does nothing is worse than a failed start.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import yaml


@dataclass
class ScheduleConfig:
    """Per-round learning-rate schedule: a factor on the base LR, by counted round."""

    KEY: ClassVar[str] = "server_optim.schedule"  # where it sits in the config, for error messages
    warmup_rounds: int = 0
    decay: str = "none"  # none | step | exponential
    step_size: Optional[int] = None  # step decay only: multiply by gamma every step_size rounds
    gamma: float = 1.0  # step / exponential decay factor; 1.0 means no decay

    def __post_init__(self) -> None:
        """Reject, before round 1, keys the chosen decay ignores and decays that do nothing."""
        key = self.KEY
        if self.decay not in ("none", "step", "exponential"):
            raise ValueError(f"unknown {key}.decay '{self.decay}'; choose none, step or exponential")
        if self.warmup_rounds < 0:
            raise ValueError(f"{key}.warmup_rounds must be >= 0, got {self.warmup_rounds}")
        if self.step_size is not None and self.decay != "step":
            raise ValueError(f"{key}.step_size is only used by decay: step, but decay is '{self.decay}'")
        if self.decay == "none":
            if self.gamma != 1.0:
                raise ValueError(f"{key}.gamma={self.gamma} does nothing with decay: none; set decay: step or exponential")
            return
        if not (self.gamma > 0 and math.isfinite(self.gamma)) or self.gamma == 1.0:
            raise ValueError(f"{key}.decay: {self.decay} needs a gamma > 0 other than 1.0 (1.0 never decays), got {self.gamma}")
        if self.decay == "step" and not (isinstance(self.step_size, int) and self.step_size >= 1):
            raise ValueError(f"{key}.decay: step needs step_size >= 1 (rounds between decays), got {self.step_size}")


@dataclass
class ClientScheduleConfig(ScheduleConfig):
    """The clients' LR per round (client.lr times the factor), as the server's schedule."""

    KEY: ClassVar[str] = "client.schedule"


@dataclass
class ClientConfig:
    """Local work of one client in one round."""

    optim: str = "adam"  # sgd | adam
    lr: float = 1e-3
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    local_epochs: int = 1
    max_steps: Optional[int] = None  # stop a client after this many local steps
    grad_clip: float = 5.0
    max_duration: Optional[float] = 60.0  # seconds of audio per batch (Lhotse sampler)
    max_cuts: Optional[int] = None  # utterances per batch
    accum_grad: int = 1
    audio_cache_mb: Optional[float] = None  # keep decoded audio across epochs and rounds (per worker process)
    # The client optimizer starts afresh each round: a fresh Adam's first steps move every
    # weight by about lr whatever its gradient's scale. Ramping the LR linearly over the
    # round's first warmup_steps local steps lets its moment estimates settle first.
    warmup_steps: int = 0
    schedule: ClientScheduleConfig = field(default_factory=ClientScheduleConfig)  # client.lr by round
    use_amp: bool = False  # mixed precision on the GPU (--ngpu 1): ESPnet's autocast with a GradScaler

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"client.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.audio_cache_mb is not None and self.audio_cache_mb <= 0:
            raise ValueError(f"client.audio_cache_mb must be > 0 (or null: no cache), got {self.audio_cache_mb}")


@dataclass
class ServerOptimConfig:
    """The optimizer that steps on the aggregated pseudo-gradient (SGD lr=1 is FedAvg)."""

    name: str = "sgd"  # sgd | adam | lamb
    lr: float = 1.0
    momentum: float = 0.0  # sgd only
    nesterov: bool = False  # sgd only
    betas: Optional[Sequence[float]] = None  # adam / lamb only; None: (0.9, 0.999)
    eps: Optional[float] = None  # adam / lamb only; None: 1e-8
    weight_decay: float = 0.0
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        """Options of another optimizer would be silently ignored: reject them."""
        if self.name not in ("sgd", "adam", "lamb"):
            raise ValueError(f"unknown server_optim '{self.name}'; choose sgd, adam or lamb")
        if self.name == "sgd":
            unused = [k for k in ("betas", "eps") if getattr(self, k) is not None]
            owner = "adam/lamb"
        else:
            unused = [k for k in ("momentum", "nesterov") if getattr(self, k)]
            owner = "sgd"
        if unused:
            raise ValueError(f"server_optim '{self.name}' does not use: {', '.join(unused)} (those are {owner} options)")


@dataclass
class StrategyConfig:
    """Aggregation strategy; keys not used by the chosen strategy are rejected by it."""

    name: str = "fedavg"  # fedavg | dga | rl_dga | bmuf | fedprox | a robust rule (below)
    # fedavg / fedprox
    weight_by: Optional[str] = None  # fedavg: num_utts | num_frames | uniform; dga, rl_dga: loss_per_token | train_loss | grad_rms | grad_var | uniform
    # dga; rl_dga's softmax-DGA reference
    beta: Optional[float] = None
    # rl_dga: the agent (see strategies/rl_dga.py)
    held_out_utts: Optional[int] = None  # server-side held-out utterances, carved from the dev set (which loses them)
    temperature: Optional[float] = None  # weights = softmax(q / temperature): smaller trusts the agent's values more
    explore_std: Optional[float] = None  # std of the Gaussian noise on the scores in round 1
    explore_decay: Optional[float] = None  # ... multiplied by this every round
    explore_min: Optional[float] = None  # ... never below this
    agent_hidden: Optional[int] = None  # width of the agent's two hidden layers
    agent_lr: Optional[float] = None  # Adam learning rate of the agent
    memory_size: Optional[int] = None  # rounds kept in the replay memory
    batch_rounds: Optional[int] = None  # rounds per replay minibatch
    updates_per_round: Optional[int] = None  # agent optimizer steps after each round
    # bmuf
    block_momentum: Optional[float] = None
    block_lr: Optional[float] = None
    nesterov: Optional[bool] = None
    # fedprox
    mu: Optional[float] = None
    # robust rules (see strategies/robust.py): median | trimmed_mean | krum | geometric_median | centered_clipping | norm_bounding
    trim_fraction: Optional[float] = None  # trimmed_mean: β, the fraction dropped at each end per coordinate
    num_byzantine: Optional[int] = None  # krum: f, the attackers among the K clients it tolerates
    num_selected: Optional[int] = None  # krum: m, the rows averaged (null: K - f)
    tolerance: Optional[float] = None  # geometric_median: stop when a Weiszfeld step is below tolerance x the norm
    max_iterations: Optional[int] = None  # geometric_median: Weiszfeld iterations at most
    clip_radius: Optional[float] = None  # centered_clipping: τ
    clip_iterations: Optional[int] = None  # centered_clipping: clipping iterations per round
    bucket_size: Optional[int] = None  # any robust rule: average random buckets of this many clients first
    memory_limit_mb: Optional[float] = None  # any robust rule: refuse a K whose K x d matrices exceed this


@dataclass
class PrivacyConfig:
    """Client-level differential privacy (DP-FedAvg; fl_lib/fl/privacy.py). `clip: null` is no DP,
    and then every other key must stay at its default."""

    clip: Optional[float] = None  # L2 bound of each client's Δ (what training changes: client.trained_entries)
    per_layer: bool = False  # bound each tensor of Δ by clip / sqrt(number of tensors) instead of the whole Δ by clip
    noise_multiplier: Optional[float] = None  # σ: Gaussian noise of std σ·clip on the round's sum of clipped Δ
    target_epsilon: Optional[float] = None  # or: σ solved before training so that `rounds` rounds spend this ε
    delta: Optional[float] = None  # null: 1 / N^1.1 for N clients
    accountant: str = "rdp"  # rdp | pld (pld: Poisson sampling only; dp-accounting has no PLD for fixed-size cohorts)
    # Adaptive clipping (Andrew et al., 2021): clip follows the target quantile γ of the clients' norms,
    # clip ← clip · exp(−clip_lr (b̃ − γ)), b̃ the noised fraction of unclipped clients (noise std count_noise)
    target_quantile: Optional[float] = None  # γ; null: a fixed clip
    clip_lr: Optional[float] = None  # η_C (default 0.2)
    count_noise: Optional[float] = None  # σ_b, std of the noise on the count (default K / 20)

    def __post_init__(self) -> None:
        if self.accountant not in ("rdp", "pld"):
            raise ValueError(f"privacy.accountant must be rdp or pld, got {self.accountant!r}")
        if self.clip is None:
            given = [k for k in ("noise_multiplier", "target_epsilon", "delta") if getattr(self, k) is not None]
            if self.per_layer:
                given.append("per_layer")
            if self.accountant != "rdp":
                given.append("accountant")
            given += [k for k in ("target_quantile", "clip_lr", "count_noise") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"privacy.{', privacy.'.join(given)} do nothing without privacy.clip (the L2 bound that makes DP)")
            return
        if self.clip <= 0:
            raise ValueError(f"privacy.clip must be > 0, got {self.clip}")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("privacy needs exactly one of noise_multiplier (σ) and target_epsilon (σ solved for it)")
        if self.noise_multiplier is not None and self.noise_multiplier <= 0:
            raise ValueError(f"privacy.noise_multiplier must be > 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"privacy.target_epsilon must be > 0, got {self.target_epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {self.delta}")
        if self.target_quantile is None:
            unused = [k for k in ("clip_lr", "count_noise") if getattr(self, k) is not None]
            if unused:
                raise ValueError(f"privacy.{', privacy.'.join(unused)} do nothing without privacy.target_quantile (adaptive clipping)")
        elif not 0 < self.target_quantile < 1:
            raise ValueError(f"privacy.target_quantile must be in (0, 1), got {self.target_quantile}")
        for k in ("clip_lr", "count_noise"):
            if getattr(self, k) is not None and getattr(self, k) <= 0:
                raise ValueError(f"privacy.{k} must be > 0, got {getattr(self, k)}")


ATTACKS = ("none", "sign_flip", "scale", "gaussian", "alie", "ipm", "min_max", "min_sum")
ATTACK_DIRECTIONS = ("std", "unit", "sign")  # min_max / min_sum: the perturbation -std, -mean/|mean| or -sign(mean)


@dataclass
class AttackConfig:
    """Byzantine clients (fl_lib/fl/attacks.py): `per_round` of each round's sampled clients send a forged update."""

    name: str = "none"  # none | sign_flip | scale | gaussian | alie | ipm | min_max | min_sum
    per_round: int = 0  # f: attackers among the clients sampled in each round
    scale: Optional[float] = None  # scale: the factor c (10, 100: model replacement)
    epsilon: Optional[float] = None  # ipm: the forged update is -epsilon x the honest mean
    z: Optional[float] = None  # alie: mean - z x std (null: Baruch et al.'s z_max for K and f)
    direction: Optional[str] = None  # min_max / min_sum: std | unit | sign (null: std, Shejwalkar & Houmansadr's default)
    memory_limit_mb: Optional[float] = None  # min_max / min_sum: refuse a K whose kept honest updates, with a robust strategy's rows, exceed this (null: 4096)

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(f"attack.name must be one of {ATTACKS}, got {self.name!r}")
        own = {"scale": ("scale",), "ipm": ("epsilon",), "alie": ("z",), "min_max": ("direction", "memory_limit_mb"),
               "min_sum": ("direction", "memory_limit_mb")}.get(self.name, ())
        unused = [k for k in ("scale", "epsilon", "z", "direction", "memory_limit_mb")
                  if getattr(self, k) is not None and k not in own]
        if self.name == "none" and self.per_round:
            unused.append("per_round")
        if unused:
            raise ValueError(f"attack '{self.name}' does not use: {', '.join(unused)}")
        if self.name != "none" and not (isinstance(self.per_round, int) and self.per_round >= 1):
            raise ValueError(f"attack '{self.name}' needs attack.per_round >= 1 (attackers per round), got {self.per_round}")
        if self.direction is not None and self.direction not in ATTACK_DIRECTIONS:
            raise ValueError(f"attack.direction must be one of {ATTACK_DIRECTIONS}, got {self.direction!r}")
        if self.memory_limit_mb is not None and not self.memory_limit_mb > 0:
            raise ValueError(f"attack.memory_limit_mb must be > 0, got {self.memory_limit_mb}")
        for k in own:
            if k not in ("z", "direction", "memory_limit_mb") and getattr(self, k) is None:
                raise ValueError(f"attack '{self.name}' needs attack.{k}")


BEST_CRITERIA = ("acc", "loss", "wer")  # fl_lib.asr.average.criterion_score


@dataclass
class FLConfig:
    rounds: int = 10
    clients_per_round: int = 4
    # A round counts only if at least this many of its clients were aggregated; one
    # that does not leaves the model, the server optimizer and the schedule untouched.
    min_clients_per_round: int = 1
    max_failed_rounds: int = 3  # stop (non-zero exit) after this many uncounted rounds in a row
    # A client that raises in this many of its sampled rounds in a row stops the run with its first
    # traceback (null: never; such a client is still named in the log, metrics.jsonl and RESULTS.md) ...
    max_client_failures: Optional[int] = None
    drop_failing_clients: bool = False  # ... or, if true, is left out of every later round and the run goes on
    # uniform (K without replacement) | weighted (by number of utterances; fedavg then needs weight_by: uniform)
    # | poisson (each client with probability K/N: cohorts of varying size)
    sampler: str = "uniform"
    client: ClientConfig = field(default_factory=ClientConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    server_optim: ServerOptimConfig = field(default_factory=ServerOptimConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)  # robustness experiments only
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # client-level DP
    validate_every: int = 1
    keep_checkpoints: int = 5  # <round>round.pth of the N best rounds by dev score kept, for averaging
    # What "best" means for valid.acc.best.pth and the kept rounds: acc (dev accuracy, or minus
    # the dev loss for a CTC-only model, as ESPnet), loss, or wer (CTC-greedy dev WER)
    best_criterion: str = "acc"
    dev_max_duration: float = 120.0

    def __post_init__(self) -> None:
        """Counts that would break the loop late (or delete every checkpoint) fail at load."""
        for key in ("clients_per_round", "min_clients_per_round", "max_failed_rounds", "validate_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.best_criterion not in BEST_CRITERIA:
            raise ValueError(f"best_criterion must be one of {BEST_CRITERIA}, got {self.best_criterion!r}")
        if self.max_client_failures is not None and self.max_client_failures < 1:
            raise ValueError(f"max_client_failures must be >= 1 (or null: never stop for one client), got {self.max_client_failures}")
        if self.drop_failing_clients and self.max_client_failures is None:
            raise ValueError("drop_failing_clients: true does nothing without max_client_failures (after how many failures "
                             "in a row a client is dropped): set it, or remove drop_failing_clients")
        if self.attack.name != "none" and self.sampler == "poisson":
            raise ValueError("attack.per_round attackers need a fixed cohort: use sampler uniform or weighted with attacks")
        if self.attack.name == "alie" and self.attack.z is None and self.attack.per_round > self.clients_per_round // 2:
            raise ValueError(f"attack alie: Baruch et al.'s z_max needs attack.per_round <= clients_per_round / 2 "
                             f"({self.attack.per_round} of {self.clients_per_round}); set attack.z")
        if self.attack.per_round > self.clients_per_round:
            raise ValueError(f"attack.per_round={self.attack.per_round} exceeds clients_per_round={self.clients_per_round}")
        if self.min_clients_per_round > self.clients_per_round:
            raise ValueError(
                f"min_clients_per_round={self.min_clients_per_round} exceeds clients_per_round={self.clients_per_round}: no round could count"
            )

    @classmethod
    def from_yaml(cls, path: Optional[Path], overrides: Sequence[str] = ()) -> "FLConfig":
        return load_config(cls, path, overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def with_defaults(saved: dict, defaults: dict) -> dict:
    """`saved` (a config dict written by an older fl_lib) with the keys added since at their defaults,
    so it compares equal to today's config of the same experiment."""
    out = dict(defaults)
    for key, value in saved.items():
        out[key] = with_defaults(value, defaults[key]) if isinstance(value, dict) and isinstance(defaults.get(key), dict) else value
    return out


def load_config(cls, path: Optional[Path], overrides: Sequence[str] = ()):
    """Dataclass `cls` from a YAML file (None: defaults) and dotted `key=value` overrides."""
    data = {}
    if path is not None:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return from_dict(cls, data)


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ValueError(f"override '{item}' is not of the form key=value (e.g. strategy.beta=2)")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from nested dicts, rejecting unknown keys with their full path."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise ValueError(f"unknown config key(s): {names}; known: {', '.join(prefix + k for k in fields)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"config key '{prefix}{name}' must be a mapping")
            kwargs[name] = from_dict(type(default), value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)
