"""Where a round's clients train: in the server process, or in a pool of worker processes.

Both executors yield outcomes in sampling order, so streaming aggregation adds the
same numbers in the same order and results do not depend on the number of jobs.
A client that raises becomes an outcome with its traceback: the round goes on.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import traceback
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional

from .config import ClientConfig
from .strategies.base import ClientResult, State

logger = logging.getLogger(__name__)


@dataclass
class BatchSpec:
    """How a client batches its data; picklable, so worker processes can rebuild it."""

    bpemodel: Path
    token_list: Path
    max_duration: Optional[float]
    max_cuts: Optional[int]

    @cached_property
    def tokenizer(self):
        from ..data.tokenizer import Tokenizer

        return Tokenizer(self.bpemodel, self.token_list)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("tokenizer", None)  # rebuilt on first use in the worker
        return state

    def __call__(self, manifest: Path, seed: int) -> Iterable:
        from ..data.dataset import make_dataloader

        return make_dataloader(
            manifest, self.tokenizer, max_duration=self.max_duration, max_cuts=self.max_cuts, shuffle=True, seed=seed
        )


class Task(NamedTuple):
    client_id: str
    manifest: Path
    start: State
    round_idx: int
    proximal_mu: float


class Outcome(NamedTuple):
    client_id: str
    result: Optional[ClientResult]
    error: Optional[str]  # the traceback of a client that raised


def _run(trainer, task: Task) -> Outcome:
    try:
        return Outcome(task.client_id, trainer.train(*task), None)
    except Exception:  # reported with the client id by the server; never swallowed
        return Outcome(task.client_id, None, traceback.format_exc())


class SerialClients:
    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def map(self, tasks: Iterable[Task]) -> Iterator[Outcome]:
        for task in tasks:
            yield _run(self.trainer, task)

    def close(self) -> None:
        pass


_WORKER_TRAINER = None


def _init_worker(espnet_args: argparse.Namespace, conf: ClientConfig, batches: BatchSpec, seed: int) -> None:
    import torch

    from ..asr.model import build_asr_model
    from .client import LocalTrainer

    global _WORKER_TRAINER
    torch.set_num_threads(1)
    _WORKER_TRAINER = LocalTrainer(build_asr_model(espnet_args), espnet_args, conf, batches, seed)


def _run_in_worker(task: Task) -> Outcome:
    return _run(_WORKER_TRAINER, task)


class ProcessClients:
    """`jobs` worker processes, each with its own ESPnet model object."""

    def __init__(self, jobs: int, espnet_args: argparse.Namespace, conf: ClientConfig, batches: BatchSpec, seed: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pool = ctx.Pool(jobs, initializer=_init_worker, initargs=(espnet_args, conf, batches, seed))

    def map(self, tasks: Iterable[Task]) -> Iterator[Outcome]:
        return self.pool.imap(_run_in_worker, tasks)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()
