"""The federated round loop: sample, train locally, aggregate, server step, validate, checkpoint.

Each step is delegated (sampling.py, client.py, strategies/, server_optim.py,
checkpoint.py, distributed.py); this module only orders them and records what happened.

Under torchrun every rank runs this loop on its share of each round's clients
(`assign_clients`); the strategy's sums are combined with all_reduce. Rank 0
alone resumes, steps the server optimizer, validates and writes checkpoints,
metrics and TensorBoard; each round starts by broadcasting its start weights
from rank 0, so the other ranks keep no server state.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Optional, Protocol, Sequence

import torch
from tqdm import tqdm

from ..asr.average import criterion_score, rank_rounds, round_checkpoints, round_scores
from ..asr.model import espnet_config
from ..atomic import append_text, owned_temp_glob
from ..data.clients import ClientInfo
from ..data.markers import content_digest
from .attacks import NEEDS_HONEST, Attack
from .checkpoint import (atomic_copy, atomic_save, load_resumable, resume_differences, rng_states, save_checkpoint,
                         set_rng_states, truncate_metrics)
from .client import LocalTrainer, trained_entries
from .executor import BatchSpec, ProcessClients, SerialClients, Task, espnet_trainer
from .privacy import ClientDP
from .config import FLConfig
from .distributed import Ranks, all_gather_objects, assign_clients, broadcast_state
from .sampling import ClientSampler
from .server_optim import build_scheduler, build_server_optimizer, lr_factor, trial_step
from .strategies import build_strategy
from .strategies.base import ClientResult, State, weights_entropy
from .validation import evaluate, held_out_loss

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pth"
# The tag of this trainer's temporary files: on resume it removes only those, never
# another writer's (a decode averaging a model into the same directory).
OWNER = "fl_train"
# Federated-config keys that change when or how results are recorded, never what a
# round computes: a resumed run may change them (`rounds` extends a finished run).
RESUME_MAY_CHANGE = ("rounds", "validate_every", "keep_checkpoints", "dev_max_duration", "max_failed_rounds")


@dataclass
class RoundMetrics:
    round: int
    train_loss: Optional[float]
    dev_loss: Optional[float]
    dev_acc: Optional[float]
    dev_wer: Optional[float]
    clients: list
    weights: list
    dropped: list
    failed: list
    lr: float  # the server optimizer's
    client_lr: float  # client.lr times the client schedule's factor
    seconds: float  # the whole round
    train_seconds: float  # clients, aggregation and server step: the round without validation
    # The used clients' local work: optimizer steps and seconds, summed. Client steps are the
    # compute axis on which a federated and a centralized curve compare (same batch size);
    # client CPU-seconds (time.process_time of each client's training, summed over the
    # round's used clients) are the budget the centralized reference gets (--budget_from).
    client_steps: int = 0
    client_seconds: float = 0.0
    client_cpu_seconds: float = 0.0
    # The server's own CPU-seconds (time.process_time of this process): handing each result to the
    # strategy, aggregating (across torchrun ranks too), privacy noise and the server-optimizer
    # step; not client training, not forging an attacker's update, not validation. A rule's cost
    # that two runs sharing the cores do not inflate, as they inflate wall seconds.
    server_cpu_seconds: float = 0.0
    dev_score: Optional[float] = None  # what the round is ranked by for valid.acc.best.pth (best_criterion)
    strategy: dict = field(default_factory=dict)  # what the strategy decided (rl_dga: reward, agent weights, ...)
    # Clients that raised in every round they were sampled in so far (they never trained),
    # and those left out of every later round after max_client_failures (drop_failing_clients).
    always_failed: list = field(default_factory=list)
    excluded: list = field(default_factory=list)
    attacked: list = field(default_factory=list)  # clients that sent a forged update (attack.*): ground truth, never shown to the strategy
    privacy: dict = field(default_factory=dict)  # the DP ledger after this round: epsilon, delta, sigma, ... (privacy.*)


@dataclass
class FailedRound:
    """A sampled round with fewer usable clients than `min_clients_per_round`."""

    draw: int
    used: list
    dropped: list
    failed: list
    errors: dict  # client id -> traceback


class RoundsFailedError(RuntimeError):
    """Too many rounds in a row did not count: training cannot make progress."""

    def __init__(self, failures: Sequence[FailedRound], min_clients: int) -> None:
        lines = [f"{len(failures)} sampled rounds in a row had fewer than min_clients_per_round={min_clients} usable clients:"]
        for f in failures:
            lines.append(f"  draw {f.draw + 1}: used {f.used}, failed {f.failed}, dropped (non-finite) {f.dropped}")
        first = next(((f.draw, cid, tb) for f in failures for cid, tb in f.errors.items()), None)
        # No client raised and each round fell short only by clients with a non-finite loss, gradient
        # or pseudo-gradient: the model (or what attackers made of it) has diverged.
        self.diverged = first is None and all(f.dropped for f in failures)
        if first is None:
            lines.append("no client raised: every unusable client had a non-finite loss, gradient or pseudo-gradient")
        else:
            lines.append(f"first traceback (draw {first[0] + 1}, client {first[1]}):\n{first[2]}")
        super().__init__("\n".join(lines))


class ClientFailuresError(RuntimeError):
    """A client raised `max_client_failures` times in a row: stop rather than train without it unseen."""

    def __init__(self, client: str, record: dict, limit: int) -> None:
        super().__init__(
            f"client {client} failed in {record['in_a_row']} sampled rounds in a row (max_client_failures={limit}; "
            f"it failed {record['failed']} of the {record['sampled']} rounds it was sampled in). Fix its data, or set "
            f"drop_failing_clients: true to leave it out of every later round. Its first traceback "
            f"(draw {record['first_draw'] + 1}):\n{record['first_error']}"
        )


class RemoteClients(Protocol):
    """Clients that train elsewhere (a Flower federation): their index (ids and sizes; the
    manifests stay with their holders), their manifests' digests as the holders computed
    them, and the executor that sends them their tasks."""

    clients: list  # ClientInfo; `manifest` only names the holder
    digests: dict  # client id -> content digest of its manifest

    def executor(self, espnet_args: argparse.Namespace, client_conf, batches: BatchSpec, seed: int, num_threads: int): ...


class RoundCoverageError(RuntimeError):
    """The ranks' reports of a round do not account for each sampled client exactly once."""


class RanksDisagreeError(RuntimeError):
    """The torchrun ranks read different client data or settings: their rounds would silently differ."""


class FederatedServer:
    def __init__(
        self,
        model: torch.nn.Module,
        espnet_args: argparse.Namespace,
        conf: FLConfig,
        clients: Sequence[ClientInfo],
        batches: BatchSpec,
        dev_batches: Optional[Callable[[], Iterable]],
        output_dir: Path,
        seed: int,
        client_jobs: int = 1,
        held_out_batches: Optional[Callable[[], Iterable]] = None,
        ranks: Ranks = Ranks(),
        remote: Optional["RemoteClients"] = None,
    ) -> None:
        self.model = model
        self.remote = remote
        self.ranks = ranks
        self.args = espnet_args
        self.conf = conf
        self.clients = {c.id: c for c in clients}  # ids, sizes and paths: each rank opens only its own clients' manifests
        self.dev_batches = dev_batches
        self.tokenizer = batches.tokenizer  # also decodes the CTC-greedy dev hypotheses
        self.output_dir = Path(output_dir)
        self.strategy = build_strategy(conf.strategy, seed)
        if ranks.distributed and not self.strategy.ranks_reducible:
            raise ValueError(
                f"strategy '{conf.strategy.name}' runs in one process only (its client scores need state that only "
                f"rank 0 keeps); run it without torchrun, not with {ranks.world_size} ranks"
            )
        if conf.best_criterion == "wer" and getattr(model, "ctc", None) is None:
            raise ValueError("best_criterion: wer ranks rounds by the CTC-greedy dev WER: this model has no CTC head (ctc_weight 0)")
        self.held_out_batches = held_out_batches
        if self.strategy.needs_judge:
            if held_out_batches is None:
                raise ValueError(f"strategy '{conf.strategy.name}' scores candidate updates on a server-side held-out set: none was given")
            self.strategy.judge = self._held_out_loss
        self.attack = Attack(conf.attack, seed)
        self._server_cpu = 0.0  # the round's so far (RoundMetrics.server_cpu_seconds)
        need = max(self.strategy.min_clients(), self.attack.min_clients())
        if conf.min_clients_per_round < need:
            raise ValueError(
                f"min_clients_per_round={conf.min_clients_per_round} is below the {need} usable clients a round needs here "
                f"(strategy {conf.strategy.name}, attack {conf.attack.name}): a round with fewer would stop the run instead "
                f"of not counting. Set min_clients_per_round={need}"
            )
        if ranks.distributed and conf.attack.name in NEEDS_HONEST:
            raise ValueError(f"attack '{conf.attack.name}' forges from every honest update of a round, which torchrun ranks "
                             "split between them: run it without torchrun")
        self.strategy.check_server_optimizer(conf.server_optim)
        self.strategy.check_sampler(conf.sampler)
        self.privacy = ClientDP(conf.privacy, conf, len(clients), seed) if conf.privacy.clip is not None else None
        self.sampler = ClientSampler(
            [c.id for c in clients], [c.num_cuts for c in clients], conf.clients_per_round, conf.sampler, seed
        )
        self.trained = trained_entries(model)  # what Δ covers: the aggregate never moves the constants
        if remote is not None:
            self.clients_executor = remote.executor(espnet_args, conf.client, batches, seed, torch.get_num_threads(),
                                                    self.trained)
        elif client_jobs > 1:
            self.clients_executor = ProcessClients(
                client_jobs, espnet_trainer, espnet_args, conf.client, batches, seed, torch.get_num_threads()
            )
        else:
            self.clients_executor = SerialClients(LocalTrainer(model, espnet_args, conf.client, batches, seed))

        # The global weights: parameters are server-side nn.Parameters the server
        # optimizer steps on; BatchNorm's statistics move by the plain aggregate; constants stay.
        self.param_names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.strategy.bind(self.param_names)
        self.attack.bind(self.param_names)
        self.global_state: State = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.server_params = {name: torch.nn.Parameter(self.global_state[name]) for name in self.param_names}
        for name, p in self.server_params.items():
            self.global_state[name] = p.data  # shared storage: optimizer steps update global_state
        num_floats = sum(self.global_state[k].numel() for k in self.trained)
        self.strategy.check_memory(conf.clients_per_round, num_floats)
        self.attack.check_memory(conf.clients_per_round, num_floats,
                                 self.strategy.memory_bytes(conf.clients_per_round, num_floats))
        self.optimizer = build_server_optimizer(list(self.server_params.values()), conf.server_optim)
        self.scheduler = build_scheduler(self.optimizer, conf.server_optim.schedule)
        self.seed = seed
        self.resume_checked = False
        self.round = 0  # rounds completed (counted)
        self.draws = 0  # rounds sampled, counted or not: the sampling and client-seed index
        self.best_score = -math.inf  # the best round's dev_score (best_criterion)
        # Per sampled client: {"sampled", "failed", "in_a_row", "first_draw", "first_error"}, the
        # failures of the current run of failures (max_client_failures counts those).
        self.client_failures: dict[str, dict] = {}
        self.excluded: list[str] = []  # left out for good: drop_failing_clients
        self.writer = None

    # -- checkpointing -------------------------------------------------------
    @cached_property
    def run_identity(self) -> dict:
        """What else must match for a resumed run to continue the same experiment: the
        clients' data by content, so a stage 2 re-run with other filters is refused."""
        return {
            "seed": self.seed,
            "espnet_config": espnet_config(self.args),
            "clients": self._manifest_digests(),
        }

    def _manifest_digests(self) -> dict:
        if self.remote is not None:  # the nodes hash their own manifests; the server never opens one
            return dict(sorted(self.remote.digests.items()))
        # A missing manifest is a client that fails each round it is sampled, not a start-up error.
        return {cid: content_digest(c.manifest) if c.manifest.exists() else None for cid, c in sorted(self.clients.items())}

    def state_dict(self) -> dict:
        return {
            "round": self.round,
            "draws": self.draws,
            "model": self.global_state,
            "server_optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "strategy": self.strategy.state_dict(),
            "rng": rng_states(),
            "best_score": self.best_score,
            "fl_config": self.conf.to_dict(),
            "run_identity": self.run_identity,
            "client_failures": self.client_failures,
            "excluded": self.excluded,
            "privacy": None if self.privacy is None else self.privacy.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        for name, value in state["model"].items():
            self.global_state[name].copy_(value)
        self.optimizer.load_state_dict(state["server_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.strategy.load_state_dict(state["strategy"])
        set_rng_states(state["rng"])
        self.round = state["round"]
        self.draws = state["draws"]
        self.best_score = state["best_score"]
        # A checkpoint written before failures were counted has none: counting starts at the resume.
        self.client_failures = {cid: dict(c) for cid, c in state.get("client_failures", {}).items()}
        self.excluded = list(state.get("excluded", []))
        if self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])

    def maybe_resume(self) -> None:
        """Load checkpoint.pth (or the one before it, if it is damaged) after checking it belongs to this experiment.

        Under torchrun every rank first checks that all ranks read the same clients and
        settings; then rank 0 alone resumes: the other ranks get the round counters in
        `fit` and the weights each round."""
        self.resume_checked = True
        if self.ranks.distributed:
            self._check_ranks_agree()
        if not self.ranks.is_main:
            return
        for stale in self.output_dir.glob(owned_temp_glob(OWNER)):  # half-written by a killed run (atomic_save)
            stale.unlink()
        loaded = load_resumable(self.output_dir / CHECKPOINT)
        if loaded is None:
            return
        state, path = loaded
        # A key added since the checkpoint was written counts at its default there (resume_differences).
        differs = resume_differences(state["fl_config"], FLConfig().to_dict(), self.conf.to_dict(), RESUME_MAY_CHANGE,
                                     state["run_identity"], self.run_identity)
        if differs:
            raise ValueError(
                f"{path} belongs to another experiment: {', '.join(differs)} differ. Resume needs the same "
                f"federated config, ESPnet config, seed and clients (ids and manifest content); use another --output_dir, "
                f"or remove {path.parent} to start over."
            )
        self.load_state_dict(state)
        truncate_metrics(self.output_dir / "metrics.jsonl", "round", self.round, OWNER)
        logger.info(f"resumed from {path}: {self.round} of {self.conf.rounds} rounds done")

    def _check_ranks_agree(self) -> None:
        """Every rank reads clients.jsonl, the manifests and the config itself, and divides each
        round by the clients' durations: ranks that read different files would train other
        clients or another split, and nothing else would notice. Raised on every rank alike."""
        manifests = self.run_identity["clients"]  # content digests, as the resume check compares them
        index = {cid: [c.num_cuts, c.duration, manifests[cid]] for cid, c in sorted(self.clients.items())}
        mine = {"client index": index, "federated config": self.conf.to_dict(), "seed": self.seed}
        per_rank = all_gather_objects({k: _digest(v) for k, v in mine.items()})
        differ = [k for k in mine if len({r[k] for r in per_rank}) > 1]
        if not differ:
            return
        lines = [f"the {len(per_rank)} torchrun ranks disagree on: {', '.join(differ)} (every rank reads --train_clients, "
                 "its manifests, --fl_config and --seed itself: give every rank the same files)"]
        lines += [f"  rank {r}: " + ", ".join(f"{k} {d[k][:12]}" for k in differ) for r, d in enumerate(per_rank)]
        if "client index" in differ:
            indexes = all_gather_objects(index)  # every rank got here alike, so every rank joins this collective
            ids = sorted(set().union(*indexes))
            odd = [cid for cid in ids if len({json.dumps(ix.get(cid)) for ix in indexes}) > 1]
            lines.append(f"  clients that differ (ids, num_cuts, duration or manifest content): {odd[:10]}"
                         + (f" and {len(odd) - 10} more" if len(odd) > 10 else ""))
        raise RanksDisagreeError("\n".join(lines))

    # -- one round -----------------------------------------------------------
    def run_round(self, draw: int) -> RoundMetrics | FailedRound | None:
        """Train the clients of the `draw`-th sample; aggregate and step only if enough of them are usable.

        `draw` counts every sampled round, counted or not, so a round that did not
        count is followed by a fresh sample rather than the same clients again.
        Under torchrun a rank other than 0 returns None for a round that counted:
        rank 0 stepped and records it.
        """
        t0 = time.perf_counter()
        label = f"round {self.round + 1}" + (f" (draw {draw + 1})" if draw != self.round else "")
        sampled = self.sampler.sample(draw)
        if self.excluded and set(sampled) & set(self.excluded):
            logger.warning(f"{label}: left out {[c for c in sampled if c in self.excluded]}: dropped after "
                           f"max_client_failures={self.conf.max_client_failures} failures in a row (drop_failing_clients)")
            sampled = [c for c in sampled if c not in self.excluded]
        start = self._round_start()
        mine = sampled
        if self.ranks.distributed:
            seconds = [self.clients[cid].duration for cid in sampled]
            mine = assign_clients(sampled, seconds, self.ranks.world_size)[self.ranks.rank]
        self.strategy.begin_round()
        self.attack.begin_round()
        if self.privacy is not None:
            self.privacy.begin_round()
            if self.ranks.distributed:  # rank 0 adapts the clip (and resumed it): every rank bounds by it
                clip = [self.privacy.clip_norm]
                torch.distributed.broadcast_object_list(clip, 0)
                self.privacy.clip_norm = clip[0]
        attackers = set(self.attack.choose(sampled, draw))
        self._server_cpu = 0.0
        held = []  # the attackers' results, forged once every honest result was seen
        losses, used, dropped, failed, errors, work = {}, [], [], [], {}, {}
        lr_scale = lr_factor(self.round, self.conf.client.schedule)
        tasks = (Task(cid, self.clients[cid].manifest, start, draw, self.strategy.proximal_mu, lr_scale) for cid in mine)
        for cid, result, error, worker in self.clients_executor.map(tasks):
            if error is not None:
                logger.error(f"{label}: client {cid} failed; the round goes on without it\n{error}")
                failed.append(cid)
                errors[cid] = error
                continue
            if result.all_steps_invalid:
                logger.warning(f"{label}: client {cid} dropped: every local step had a non-finite gradient norm (Δ = 0)")
                dropped.append(cid)
                continue
            if not result.is_finite():
                logger.warning(f"{label}: client {cid} dropped: non-finite loss or pseudo-gradient (loss={result.train_loss})")
                dropped.append(cid)
                continue
            logger.info(
                f"{label}: client {cid}: train_loss={result.train_loss:.4f} utts={result.num_utts} "
                f"steps={result.num_steps} {result.seconds:.1f}s {worker}"
            )
            if cid in attackers:
                held.append(result)
            else:
                self.attack.observe(result)
                self._add(result)
            losses[cid] = result.train_loss
            work[cid] = (result.num_steps, result.seconds, result.cpu_seconds)
            used.append(cid)
            del result
        if self.ranks.distributed:
            used, dropped, failed, errors, losses, work = _merge(all_gather_objects((used, dropped, failed, errors, losses, work)), sampled)
        self._count_failures(draw, sampled, failed, errors)
        released = self.privacy is not None and self.conf.sampler == "poisson"  # every round, empty ones too (privacy.py)
        if len(used) < self.conf.min_clients_per_round and not released:
            # Checked before aggregate(): a stateful strategy (BMUF) must not see this round either; and before
            # the attackers forge: min_clients_per_round leaves them the honest updates they forge from.
            logger.error(
                f"{label}: only {len(used)} of {len(sampled)} clients usable, min_clients_per_round is "
                f"{self.conf.min_clients_per_round}: the round does not count (model, optimizer and schedule unchanged)"
            )
            return FailedRound(draw, used, dropped, failed, errors)
        for result in held:
            self._add(self.attack.forge(result, draw, len(sampled)))
        attacked = sorted(r.client_id for r in held)
        del held
        cpu0 = time.process_time()
        if self.ranks.distributed:
            attacked = sorted(c for part in all_gather_objects(attacked) for c in part)
            if self.privacy is not None:
                self.privacy.merge_counts(all_gather_objects((self.privacy.clipped, self.privacy.seen)))
            self.strategy.all_reduce(self._trained_state())
            if not self.ranks.is_main:
                return None
        aggregate = self.strategy.aggregate()
        if self.privacy is not None:
            aggregate = self.privacy.privatize(aggregate, len(used), draw, self._trained_state())
        lr = self.optimizer.param_groups[0]["lr"]
        self._server_step(aggregate.pseudo_grad)
        if self.privacy is not None:
            self.privacy.project(self.global_state)
        self.scheduler.step()
        self._server_cpu += time.process_time() - cpu0
        train_seconds = time.perf_counter() - t0
        round_no = self.round + 1
        dev = {}
        if self.dev_batches is not None and (round_no % self.conf.validate_every == 0 or round_no == self.conf.rounds):
            self.model.load_state_dict(self.global_state)
            dev = evaluate(self.model, self.dev_batches(), self.tokenizer)
        return RoundMetrics(
            round=round_no,
            train_loss=sum(losses[c] for c in used) / len(used) if used else None,
            dev_loss=dev.get("loss"),
            dev_acc=dev.get("acc"),
            dev_wer=dev.get("wer"),
            clients=used,
            weights=[aggregate.weights[c] for c in used],
            dropped=dropped,
            failed=failed,
            lr=lr,
            client_lr=self.conf.client.lr * lr_scale,
            seconds=time.perf_counter() - t0,
            train_seconds=train_seconds,
            client_steps=sum(work[c][0] for c in used),
            client_seconds=sum(work[c][1] for c in used),
            client_cpu_seconds=sum(work[c][2] for c in used),
            server_cpu_seconds=self._server_cpu,
            strategy=self.strategy.round_metrics(),
            always_failed=self.always_failed(),
            excluded=list(self.excluded),
            attacked=attacked,
            privacy={} if self.privacy is None else self.privacy.report(draw + 1),
        )

    def _add(self, result: ClientResult) -> None:
        """Hand a result to the strategy, its Δ bounded first under privacy.*."""
        cpu0 = time.process_time()
        self.strategy.add(result if self.privacy is None else self.privacy.bound(result))
        self._server_cpu += time.process_time() - cpu0

    def _count_failures(self, draw: int, sampled: Sequence[str], failed: Sequence[str], errors: dict) -> None:
        """Count each sampled client's failures in a row; at `max_client_failures` stop the run
        with its first traceback, or (drop_failing_clients) leave it out of every later round.

        Every rank counts from the same merged lists, so under torchrun all ranks stop alike."""
        for cid in sampled:
            c = self.client_failures.setdefault(cid, {"sampled": 0, "failed": 0, "in_a_row": 0, "first_draw": None, "first_error": None})
            c["sampled"] += 1
            if cid in failed:
                c["failed"] += 1
                c["in_a_row"] += 1
                if c["in_a_row"] == 1:
                    c["first_draw"], c["first_error"] = draw, errors.get(cid)
            else:
                c.update(in_a_row=0, first_draw=None, first_error=None)
        limit = self.conf.max_client_failures
        over = [cid for cid in sampled if limit is not None and self.client_failures[cid]["in_a_row"] >= limit]
        if over and not self.conf.drop_failing_clients:
            raise ClientFailuresError(over[0], self.client_failures[over[0]], limit)
        for cid in over:
            c = self.client_failures[cid]
            logger.error(f"client {cid} failed in {c['in_a_row']} sampled rounds in a row: dropped, it is left out of every "
                         f"later round (drop_failing_clients). Its first traceback (draw {c['first_draw'] + 1}):\n{c['first_error']}")
            self.excluded.append(cid)

    def always_failed(self) -> list[str]:
        """Clients that raised in every round they were sampled in: they never trained."""
        return sorted(cid for cid, c in self.client_failures.items() if c["failed"] == c["sampled"])

    def _round_start(self) -> State:
        """The weights the round's clients start from: the strategy's, broadcast from rank 0 under torchrun.

        The other ranks receive them into their `global_state`, which they use for nothing else."""
        if not self.ranks.distributed:
            return self.strategy.broadcast(self.global_state)
        if self.ranks.is_main:
            start = dict(self.strategy.broadcast(self.global_state))
            broadcast_state(start)
            return start
        broadcast_state(self.global_state)
        return self.global_state

    def _held_out_loss(self, pseudo_grad: State) -> float:
        """Held-out loss of the model one server step on `pseudo_grad` would give. The global state
        and the server optimizer are untouched: the candidate is built by `trial_step` on copies."""
        candidate = trial_step(self.optimizer, self.server_params, self.global_state, pseudo_grad)
        self.model.load_state_dict(candidate)
        return held_out_loss(self.model, self.held_out_batches())

    def _trained_state(self) -> State:
        """The global entries a round's aggregate covers (shapes for a rank or a cohort without clients)."""
        return {k: self.global_state[k] for k in self.trained}

    @torch.no_grad()
    def _server_step(self, pseudo_grad: State) -> None:
        for name, g in pseudo_grad.items():
            if name in self.server_params:
                self.server_params[name].grad = g
            else:  # BatchNorm's running statistics follow the aggregate directly
                self.global_state[name].sub_(g)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- the loop ------------------------------------------------------------
    def fit(self) -> None:
        """Run rounds until `conf.rounds` have counted; raise `RoundsFailedError` after
        `max_failed_rounds` uncounted rounds in a row, so a broken run never exits 0."""
        from torch.utils.tensorboard import SummaryWriter

        main = self.ranks.is_main
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume_checked:
            self.maybe_resume()
        if self.ranks.distributed:  # where rank 0 resumed from
            counters = [self.round, self.draws]
            torch.distributed.broadcast_object_list(counters, 0)
            self.round, self.draws = counters
        self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self.round + 1) if main else None
        bar = tqdm(initial=self.round, total=self.conf.rounds, desc="rounds", unit="round", disable=not main)
        failures: list[FailedRound] = []
        try:
            while self.round < self.conf.rounds:
                m = self.run_round(self.draws)
                self.draws += 1
                if isinstance(m, FailedRound):
                    failures.append(m)
                    if len(failures) >= self.conf.max_failed_rounds:
                        raise RoundsFailedError(failures, self.conf.min_clients_per_round)
                    continue
                failures.clear()
                self.round += 1
                if m is None:  # another rank's view of a round rank 0 records
                    continue
                self._record(m)
                bar.update(1)
                bar.set_postfix(train_loss=_fmt(m.train_loss), dev_acc=_fmt(m.dev_acc), dev_wer=_fmt(m.dev_wer))
        finally:
            bar.close()
            self.clients_executor.close()
            if self.writer is not None:
                self.writer.close()
        logger.info(f"federated training finished: {self.round} rounds; best dev score {_fmt(self.best_score)}")

    def _record(self, m: RoundMetrics) -> None:
        out = self.output_dir
        logger.info(
            f"round {m.round}/{self.conf.rounds}: train_loss={_fmt(m.train_loss)} dev_loss={_fmt(m.dev_loss)} "
            f"dev_acc={_fmt(m.dev_acc)} dev_wer={_fmt(m.dev_wer)} clients={len(m.clients)} dropped={len(m.dropped)} failed={len(m.failed)} "
            f"lr={m.lr:.3g} client_lr={m.client_lr:.3g} {m.seconds:.1f}s"
            + "".join(f" {k}={v:.4g}" if isinstance(v, float) else f" {k}={v}" for k, v in m.strategy.items() if not isinstance(v, dict))
            + (f" epsilon={m.privacy['epsilon']:.3g} (delta={m.privacy['delta']:.2g})" if m.privacy else "")
        )
        if m.always_failed:
            counts = ", ".join(f"{cid} ({self.client_failures[cid]['failed']}x)" for cid in m.always_failed)
            logger.warning(f"round {m.round}: never trained, failed in every round they were sampled in: {counts}")
        m.dev_score = criterion_score(self.conf.best_criterion, m.dev_loss, m.dev_acc, m.dev_wer)
        append_text(out / "metrics.jsonl", json.dumps(m.__dict__) + "\n")  # a failed write leaves no half line
        self._tensorboard(m)
        round_file = out / f"{m.round}round.pth"
        atomic_save(self.global_state, round_file, OWNER)  # serialized once, then copied
        atomic_copy(round_file, out / "latest.pth", OWNER)
        if m.dev_score is not None and m.dev_score > self.best_score:
            self.best_score = m.dev_score
            atomic_copy(round_file, out / "valid.acc.best.pth", OWNER)
        elif self.dev_batches is None or not (out / "valid.acc.best.pth").exists():
            # Without a dev set (or before the first validation) the best model is the latest.
            atomic_copy(round_file, out / "valid.acc.best.pth", OWNER)
        # ESPnet's keep_nbest_models: the best rounds by the dev criterion, not the latest.
        for worse in rank_rounds(round_checkpoints(out), round_scores(out))[self.conf.keep_checkpoints :]:
            (out / f"{worse}round.pth").unlink()
        save_checkpoint(self.state_dict(), out / CHECKPOINT, OWNER)

    def _tensorboard(self, m: RoundMetrics) -> None:
        w, step = self.writer, m.round
        if m.train_loss is not None:
            w.add_scalar("train/loss", m.train_loss, step)
        if m.dev_loss is not None:
            w.add_scalar("dev/loss", m.dev_loss, step)
        if m.dev_acc is not None:  # a CTC-only model reports no accuracy
            w.add_scalar("dev/acc", m.dev_acc, step)
        if m.dev_wer is not None:
            w.add_scalar("dev/wer_ctc_greedy", m.dev_wer, step)
        if m.privacy:
            w.add_scalar("privacy/epsilon", m.privacy["epsilon"], step)
        if m.weights:
            w.add_scalar("weights/mean", sum(m.weights) / len(m.weights), step)
            w.add_scalar("weights/min", min(m.weights), step)
            w.add_scalar("weights/max", max(m.weights), step)
            w.add_scalar("weights/entropy", weights_entropy(m.weights), step)
        w.add_scalar("clients/used", len(m.clients), step)
        w.add_scalar("clients/dropped", len(m.dropped) + len(m.failed), step)
        w.add_scalar("server/lr", m.lr, step)
        w.add_scalar("client/lr", m.client_lr, step)
        w.add_scalar("time/seconds_per_round", m.seconds, step)
        for key, value in m.strategy.items():
            if isinstance(value, dict):  # per client, e.g. rl_dga's agent_weights
                for cid, v in value.items():
                    w.add_scalar(f"strategy/{key}/{cid}", v, step)
            elif isinstance(value, (int, float)):
                w.add_scalar(f"strategy/{key}", value, step)
        w.flush()


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4f}"


def _merge(per_rank: list, sampled: list) -> tuple:
    """The ranks' (used, dropped, failed, errors, losses, work) as one process would have them: in sampling order.

    Raises `RoundCoverageError` unless the ranks' used, dropped and failed clients are the round's
    sample, each exactly once: a client trained twice or never would otherwise pass unseen."""
    reports = [(rank, cid) for rank, (u, d, f, *_) in enumerate(per_rank) for cid in (*u, *d, *f)]
    count = Counter(cid for _, cid in reports)
    missing = [cid for cid in sampled if count[cid] == 0]
    doubled = {cid: [r for r, c in reports if c == cid] for cid in sampled if count[cid] > 1}
    unknown = sorted(set(count) - set(sampled))
    if missing or doubled or unknown:
        raise RoundCoverageError(
            f"the ranks' reports do not cover the round's {len(sampled)} sampled clients exactly once: "
            f"never reported {missing}, reported twice or more (by ranks) {doubled}, not sampled {unknown}. "
            "The ranks divided the round differently (different client data?): the round is not aggregated"
        )
    order = {cid: i for i, cid in enumerate(sampled)}
    used, dropped, failed, errors, losses, work = [], [], [], {}, {}, {}
    for u, d, f, e, l, w in per_rank:
        used += u
        dropped += d
        failed += f
        errors.update(e)
        losses.update(l)
        work.update(w)
    by_order = lambda ids: sorted(ids, key=order.__getitem__)  # noqa: E731
    return by_order(used), by_order(dropped), by_order(failed), {c: errors[c] for c in by_order(errors)}, losses, work


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
