"""Client executors: outcomes in sampling order; a client that raises or a worker that dies fails only its clients."""
from __future__ import annotations

import os

from fl_lib.fl.executor import ProcessClients, SerialClients, Task


class ToyTrainer:
    """Returns a number derived from the client id; `crash-*` clients kill their worker, `raise-*` ones raise."""

    def __init__(self, scale: int) -> None:
        self.scale = scale

    def train(self, client_id, manifest, start, round_idx, proximal_mu, lr_scale):
        if client_id.startswith("crash"):
            os._exit(3)  # what an OOM kill or a segfault looks like to the pool
        if client_id.startswith("raise"):
            raise ValueError(f"bad data in {manifest}")
        return self.scale * int(client_id.rsplit("-", 1)[1]) + start["offset"]


def _tasks(ids):
    return [Task(cid, f"{cid}.jsonl.gz", {"offset": 1}, 0, 0.0) for cid in ids]


def test_serial_reports_a_raising_client_and_goes_on():
    out = list(SerialClients(ToyTrainer(10)).map(_tasks(["ok-1", "raise-2", "ok-3"])))
    assert [(o.client_id, o.result) for o in out] == [("ok-1", 11), ("raise-2", None), ("ok-3", 31)]
    assert "ValueError: bad data in raise-2.jsonl.gz" in out[1].error


def test_process_pool_survives_a_dead_worker():
    """A killed worker fails the clients in flight, never hangs; the pool is rebuilt for the rest."""
    ids = ["ok-1", "ok-2", "crash-3", "ok-4", "ok-5", "ok-6"]
    executor = ProcessClients(2, ToyTrainer, 10)
    try:
        out = list(executor.map(_tasks(ids)))
        assert [o.client_id for o in out] == ids  # sampling order, whatever finishes first
        assert out[2].result is None and "died" in out[2].error and "crash-3" in out[2].error
        ok = {o.client_id: o.result for o in out if o.error is None}
        assert {"ok-1", "ok-2", "ok-5", "ok-6"} <= set(ok)  # ok-4 may share the broken pool with crash-3
        assert all(value == 10 * int(cid[-1]) + 1 for cid, value in ok.items())
        again = list(executor.map(_tasks(["ok-7", "raise-8"])))  # the next round gets a working pool
        assert again[0].result == 71 and "ValueError" in again[1].error
    finally:
        executor.close()
