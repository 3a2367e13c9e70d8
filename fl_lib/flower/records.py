"""fl_lib's client task and client result as Flower records: what crosses the transport.

A train instruction carries the round's start weights (`ArrayRecord`), the task (client id,
draw, FedProx μ, client LR factor) and the setup a node needs to build the same
`LocalTrainer` the native run uses (ESPnet model config, client config, tokenizer and
feature-statistics files, seed, threads). The reply carries the pseudo-gradient and the
`ClientResult` statistics our strategies score. The server checks every reply against the
global weights before a strategy sees it: a malformed or non-finite update is rejected with
its reason, never averaged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..fl.executor import Task as ServerTask
from ..fl.strategies.base import ClientResult, State

# ClientResult's statistics by type, from the dataclass itself, so a field added there crosses the
# wire too (MetricRecord holds ints and floats; flags go as 0/1).
_STATS = {f.name: f.type for f in dataclasses.fields(ClientResult) if f.name not in ("client_id", "delta")}
_FLOATS = tuple(k for k, t in _STATS.items() if t == "float")
_INTS = tuple(k for k, t in _STATS.items() if t == "int")
_FLAGS = tuple(k for k, t in _STATS.items() if t == "bool")
if len(_FLOATS) + len(_INTS) + len(_FLAGS) != len(_STATS):
    raise TypeError(f"ClientResult has a statistic that is no float, int or bool, which records.py cannot send: {_STATS}")


class MalformedUpdate(ValueError):
    """A client reply the server refuses to aggregate; the message says why."""


class Task(NamedTuple):
    """A train instruction as a node reads it."""

    client_id: str
    start: State
    draw: int
    proximal_mu: float
    lr_scale: float
    setup: "ClientSetup"


@dataclass(frozen=True)
class ClientSetup:
    """What a node needs to build the server's `LocalTrainer`: sent with every task, so a node
    holds nothing of the experiment but its own clients' data."""

    espnet_config: dict  # ESPnet's config.yaml of the experiment (fl_lib.asr.model.espnet_config)
    client: dict  # the fl_config's client section (ClientConfig)
    batches: dict  # BatchSpec's max_duration, max_cuts, audio_cache_mb
    files: dict  # name -> bytes: the tokenizer model, the token list, the feature statistics
    seed: int
    num_threads: int

    def _meta(self) -> str:
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k != "files"}, sort_keys=True)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"setup": self._meta(), **{f"file:{k}": v for k, v in self.files.items()}})

    def key(self) -> str:
        """The setup's identity: the same key builds the same `LocalTrainer`."""
        files = sorted((k, hashlib.sha256(v).hexdigest()) for k, v in self.files.items())
        return hashlib.sha256((self._meta() + json.dumps(files)).encode()).hexdigest()

    @classmethod
    def from_record(cls, record: ConfigRecord) -> "ClientSetup":
        meta = json.loads(record["setup"])
        files = {k.split(":", 1)[1]: bytes(v) for k, v in record.items() if k.startswith("file:")}
        return cls(files=files, **meta)


def task_content(task: ServerTask, setup: ClientSetup) -> RecordDict:
    config = {"client-id": task.client_id, "draw": task.round_idx, "proximal-mu": float(task.proximal_mu),
              "lr-scale": float(task.lr_scale)}
    return RecordDict({"arrays": ArrayRecord(_cpu(task.start)), "task": ConfigRecord(config), "setup": setup.to_record()})


def read_task(content: RecordDict) -> Task:
    task = content.config_records["task"]
    start = dict(content.array_records["arrays"].to_torch_state_dict())
    return Task(str(task["client-id"]), start, int(task["draw"]), float(task["proximal-mu"]), float(task["lr-scale"]),
                ClientSetup.from_record(content.config_records["setup"]))


def result_content(result: ClientResult) -> RecordDict:
    metrics = {k: float(getattr(result, k)) for k in _FLOATS}
    metrics.update({k: int(getattr(result, k)) for k in _INTS})
    metrics.update({k: int(bool(getattr(result, k))) for k in _FLAGS})
    metrics["num-examples"] = int(result.num_utts)  # the key Flower's own strategies weight by
    return RecordDict({"delta": ArrayRecord(_cpu(result.delta)), "metrics": MetricRecord(metrics),
                       "client": ConfigRecord({"client-id": result.client_id})})


def read_result(content: RecordDict, client_id: str, reference: Mapping[str, torch.Tensor]) -> ClientResult:
    """The `ClientResult` of a reply, or `MalformedUpdate` with the reason.

    `reference` is the global state: Δ must have exactly its floating-point entries, each
    of the same shape and dtype. Finiteness is checked here rather than trusted from the
    client's own flag; a non-finite statistic or Δ comes back with `delta_finite` false,
    which the server drops and logs as it drops a local non-finite client.
    """
    try:
        sent_id = content.config_records["client"]["client-id"]
        arrays = content.array_records["delta"]
        metrics = content.metric_records["metrics"]
    except KeyError as e:
        raise MalformedUpdate(f"client {client_id}: reply lacks the record {e}") from None
    if sent_id != client_id:
        raise MalformedUpdate(f"client {client_id}: the reply is for client {sent_id!r}")
    missing = [k for k in _STATS if k not in metrics]
    if missing:
        raise MalformedUpdate(f"client {client_id}: reply lacks the statistics {missing}")
    odd = [k for k in _STATS if not isinstance(metrics[k], (int, float))]
    if odd:
        raise MalformedUpdate(f"client {client_id}: statistics that are not numbers: {odd}")
    expected = {k: v for k, v in reference.items() if v.is_floating_point()}
    if set(arrays.keys()) != set(expected):
        extra, absent = sorted(set(arrays.keys()) - set(expected)), sorted(set(expected) - set(arrays.keys()))
        raise MalformedUpdate(f"client {client_id}: Δ does not match the model: unknown entries {extra[:5]}, "
                              f"missing entries {absent[:5]}")
    try:
        delta = dict(arrays.to_torch_state_dict())
    except (TypeError, ValueError) as e:  # bytes that are no NumPy array, a dtype torch has not
        raise MalformedUpdate(f"client {client_id}: Δ does not deserialize: {e}") from None
    for name, ref in expected.items():
        if delta[name].shape != ref.shape or delta[name].dtype != ref.dtype:
            raise MalformedUpdate(f"client {client_id}: Δ[{name}] is {tuple(delta[name].shape)} {delta[name].dtype}, "
                                  f"the model's is {tuple(ref.shape)} {ref.dtype}")
    stats = {k: float(metrics[k]) for k in _FLOATS}
    counts = {k: int(metrics[k]) for k in _INTS}
    if any(v < 0 for v in counts.values()):
        raise MalformedUpdate(f"client {client_id}: negative counts {counts}")
    finite = bool(metrics["delta_finite"]) and all(bool(torch.isfinite(d).all()) for d in delta.values())
    flags = {k: bool(metrics[k]) for k in _FLAGS}
    flags["delta_finite"] = finite and all(map(math.isfinite, stats.values()))
    return ClientResult(client_id=client_id, delta=delta, **stats, **counts, **flags)


def _cpu(state: Mapping[str, torch.Tensor]) -> dict:
    """CPU tensors: Flower serializes through NumPy (the models here are float32, which NumPy holds bitwise)."""
    return {k: v.detach().cpu() for k, v in state.items()}
