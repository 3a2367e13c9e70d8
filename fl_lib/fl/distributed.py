"""torch.distributed for federated rounds: which rank trains which clients, and the collectives.

`fl_train` run by `torchrun` finds RANK, WORLD_SIZE and LOCAL_RANK in its
environment and joins the process group: gloo on CPU, NCCL with one GPU per rank.
Every rank trains its share of a round's clients into its own streaming sums;
the strategy combines the ranks' sums with all_reduce; rank 0 alone steps the
server optimizer, and broadcasts the next round's start weights. We build no
transport of our own.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Sequence

import torch


def resolve_device(ngpu: int, local_rank: int = 0) -> torch.device:
    """`cuda:<local_rank>` with `ngpu` 1, the CPU with 0. No GPU for `ngpu` 1 is an error, never a CPU fallback."""
    if ngpu not in (0, 1):
        raise ValueError(f"--ngpu is the GPUs of one process, 0 or 1 (run more processes with torchrun), got {ngpu}")
    if ngpu == 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--ngpu 1 asks for a GPU, but torch sees no CUDA device (torch.cuda.is_available() is False); "
                           "use --ngpu 0 to run on the CPU")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"local rank {local_rank} needs GPU {local_rank}, but only {torch.cuda.device_count()} are visible: "
                           "one GPU per rank (torchrun --nproc_per_node <= number of GPUs)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job; world_size 1 is a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(ngpu: int, timeout_s: float) -> Ranks:
    """Join torchrun's process group if there is one (WORLD_SIZE > 1).

    `timeout_s` bounds every collective: a rank that died or hangs makes the others
    fail with a timeout instead of waiting forever. It must exceed the slowest
    rank's client training in one round, as the ranks meet once per round.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ranks = Ranks(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if ranks.distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "nccl" if ngpu else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
    return ranks


def assign_clients(client_ids: Sequence[str], seconds: Sequence[float], world_size: int) -> list[list[str]]:
    """Each rank's share of a round's clients, balanced by audio seconds, not by count.

    Greedy largest-first (LPT): clients by decreasing duration (ties by id) go to the
    rank with the least seconds so far (ties to the lower rank). Deterministic, so
    every rank computes the same split without talking. Within a share, clients keep
    the round's sampling order.
    """
    load = [0.0] * world_size
    owner = {}
    for cid, sec in sorted(zip(client_ids, seconds), key=lambda p: (-p[1], p[0])):
        r = min(range(world_size), key=lambda i: (load[i], i))
        owner[cid] = r
        load[r] += sec
    return [[cid for cid in client_ids if owner[cid] == r] for r in range(world_size)]


def broadcast_state(state: dict, src: int = 0) -> None:
    """Overwrite every rank's `state` tensors with rank `src`'s, in place: one broadcast per dtype."""
    by_dtype: dict = {}
    for name, t in state.items():
        by_dtype.setdefault(t.dtype, []).append(name)
    for names in by_dtype.values():
        flat = torch.cat([state[n].reshape(-1) for n in names])
        torch.distributed.broadcast(flat, src)
        offset = 0
        for n in names:
            t = state[n]
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (small, picklable: client ids, losses, tracebacks), in rank order."""
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
