"""Where a round's clients train: in the server process, or in a pool of worker processes.

Both executors yield outcomes in sampling order, so streaming aggregation adds the
same numbers in the same order and results do not depend on the number of jobs.
A client that raises becomes an outcome with its traceback: the round goes on.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import traceback
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

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
    audio_cache_mb: Optional[float] = None  # decoded audio kept by the process that trains clients

    @cached_property
    def tokenizer(self):
        from ..data.tokenizer import Tokenizer

        return Tokenizer(self.bpemodel, self.token_list)

    @cached_property
    def audio_cache(self):
        from ..data.dataset import AudioCache

        return None if self.audio_cache_mb is None else AudioCache(self.audio_cache_mb)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("tokenizer", None)  # rebuilt on first use in the worker
        state.pop("audio_cache", None)  # each worker process caches what its clients read
        return state

    def __call__(self, manifest: Path, seed: int) -> Iterable:
        from ..data.dataset import make_dataloader

        return make_dataloader(
            manifest, self.tokenizer, max_duration=self.max_duration, max_cuts=self.max_cuts, shuffle=True, seed=seed,
            audio_cache=self.audio_cache,
        )


class Task(NamedTuple):
    client_id: str
    manifest: Path
    start: State
    round_idx: int
    proximal_mu: float
    lr_scale: float = 1.0  # the client LR schedule's factor for this round


class Outcome(NamedTuple):
    client_id: str
    result: Optional[ClientResult]
    error: Optional[str]  # the traceback of a client that raised
    worker: Optional[str] = None  # where the client trained, for the log: "pid=<n>", or "node=<id>" over Flower


def _run(trainer, task: Task) -> Outcome:
    try:
        return Outcome(task.client_id, trainer.train(*task), None, f"pid={os.getpid()}")
    except Exception:  # reported with the client id by the server; never swallowed
        return Outcome(task.client_id, None, traceback.format_exc(), f"pid={os.getpid()}")


class SerialClients:
    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def map(self, tasks: Iterable[Task]) -> Iterator[Outcome]:
        for task in tasks:
            yield _run(self.trainer, task)

    def close(self) -> None:
        pass


def espnet_trainer(espnet_args: argparse.Namespace, conf: ClientConfig, batches: BatchSpec, seed: int, num_threads: int):
    """A worker's LocalTrainer on its own ESPnet model object.

    `num_threads` is the server's torch thread count: a different count changes
    the order of float reductions, and parallel results would no longer be bitwise
    those of a serial run.
    """
    import torch

    from ..asr.model import build_asr_model
    from .client import LocalTrainer

    torch.set_num_threads(num_threads)
    return LocalTrainer(build_asr_model(espnet_args), espnet_args, conf, batches, seed)


_WORKER_TRAINER = None


def _init_worker(make_trainer: Callable, args: tuple) -> None:
    global _WORKER_TRAINER
    _WORKER_TRAINER = make_trainer(*args)


def _run_in_worker(task: Task) -> Outcome:
    return _run(_WORKER_TRAINER, task)


class ProcessClients:
    """`jobs` worker processes, each with the trainer `make_trainer(*args)` builds.

    At most `jobs` clients are in flight, so at most that many results wait to be
    aggregated. A worker that dies (out of memory, a segfault) fails the clients
    it could not finish, reported with their ids; the pool is rebuilt and the
    round goes on, instead of waiting forever on a lost result.
    """

    def __init__(self, jobs: int, make_trainer: Callable, *args) -> None:
        self.jobs = jobs
        self.initargs = (make_trainer, args)
        self.pool: Optional[ProcessPoolExecutor] = None

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(
                self.jobs, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=self.initargs,
            )
        return self.pool

    def map(self, tasks: Iterable[Task]) -> Iterator[Outcome]:
        tasks = iter(tasks)
        in_flight: deque = deque()

        def submit_next() -> None:
            task = next(tasks, None)
            if task is not None:
                pool = self._pool()
                in_flight.append((task.client_id, pool, pool.submit(_run_in_worker, task)))

        for _ in range(self.jobs):
            submit_next()
        while in_flight:
            client_id, pool, future = in_flight.popleft()
            try:
                outcome = future.result()
            except BrokenProcessPool as e:
                if pool is self.pool:
                    self.close()  # the next submission starts a fresh pool
                outcome = Outcome(client_id, None, f"a worker process died while client {client_id} was in flight: {e!r}")
            submit_next()
            yield outcome

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
