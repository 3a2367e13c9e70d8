"""The centralized reference: ESPnet's Trainer on the pooled clients, capped by a CPU-second budget.

Covers: the budget's currency (process CPU time, the federated run's client CPU-seconds),
the N best epochs kept by the federated criterion, resume (bitwise equal to an
uninterrupted run) and its refusal of another experiment's dir, and stale epochs cleared.
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from fl_lib.asr import centralized
from fl_lib.asr.centralized import (
    CentralizedConfig, _Budget, federated_client_cpu_seconds, pooled_cuts, train_centralized,
)
from fl_lib.data.clients import load_clients
from fl_lib.fl.checkpoint import CheckpointError

CONF_DIR = Path(__file__).resolve().parents[1] / "egs/librispeech_fl/conf"


def test_pooled_cuts_hold_every_client_utterance_once(tiny_clients):
    pooled = pooled_cuts(tiny_clients)
    ids = [c.id for c in pooled]
    assert len(ids) == len(set(ids)) == sum(c.num_cuts for c in load_clients(tiny_clients))


def test_budget_stops_the_batch_stream():
    budget = _Budget(cpu_seconds=0.0)
    assert list(budget.iterate(range(5))) == []
    budget = _Budget(cpu_seconds=None)
    assert list(budget.iterate(range(5))) == list(range(5)) and not budget.exhausted()


def test_budget_counts_process_cpu_time_not_waiting():
    """The currency is CPU-seconds (time.process_time): a batch stream that waits spends
    wall-clock time but no budget; one that computes spends it."""
    def waiting():
        for i in range(3):
            time.sleep(0.2)
            yield i

    budget = _Budget(cpu_seconds=0.1)
    assert list(budget.iterate(waiting())) == [0, 1, 2]
    assert budget.wall >= 0.6 and budget.spent < 0.1 and not budget.exhausted()

    def computing():
        for i in range(5):
            t0 = time.process_time()
            while time.process_time() - t0 < 0.05:
                pass
            yield i

    budget = _Budget(cpu_seconds=0.08)
    assert list(budget.iterate(computing())) == [0, 1] and budget.exhausted() and budget.spent >= 0.08


def test_trains_epochs_and_writes_an_espnet_experiment(tiny_clients, tiny_sets, tiny_tokens, tiny_stats, tiny_asr_config, tmp_path):
    from espnet2.bin.asr_inference import Speech2Text

    bpemodel, token_list = tiny_tokens
    conf = CentralizedConfig(max_epoch=2, max_duration=15.0, warmup_steps=2)
    rows = train_centralized(
        conf, asr_config=tiny_asr_config, train_clients=tiny_clients, token_list=token_list, bpemodel=bpemodel,
        output_dir=tmp_path, feats_stats=tiny_stats, dev_cuts=tiny_sets["dev-clean"], seed=3, num_threads=1,
    )
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_seconds"] > rows[0]["train_seconds"] > 0
    assert rows[1]["train_cpu_seconds"] > rows[0]["train_cpu_seconds"] > 0
    # steps: the batches trained so far, the compute axis shared with a federated run's client steps
    from lhotse.dataset import SimpleCutSampler

    from fl_lib.asr.centralized import pooled_cuts

    def batches(epoch):
        sampler = SimpleCutSampler(pooled_cuts(tiny_clients), max_duration=15.0, shuffle=True, seed=3, world_size=1, rank=0)
        sampler.set_epoch(epoch)
        return sum(1 for _ in sampler)

    assert [r["steps"] for r in rows] == [batches(1), batches(1) + batches(2)]
    assert all(r["dev_loss"] is not None and r["dev_wer"] is not None for r in rows)
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows
    for name in ("config.yaml", "latest.pth", "valid.acc.best.pth", "2epoch.pth", "centralized_config.yaml", "checkpoint.pth"):
        assert (tmp_path / name).is_file(), name
    assert yaml.safe_load((tmp_path / "centralized_config.yaml").read_text())["max_epoch"] == 2
    Speech2Text(asr_train_config=tmp_path / "config.yaml", asr_model_file=tmp_path / "valid.acc.best.pth")


def test_budget_from_a_federated_run_is_its_client_cpu_seconds(tmp_path):
    rows = [{"round": 1, "train_seconds": 30.0, "client_cpu_seconds": 50.0},
            {"round": 2, "train_seconds": 90.0, "client_cpu_seconds": 70.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert federated_client_cpu_seconds(tmp_path) == 120.0  # not the rounds' 120 s of train_seconds / 60
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1, "train_seconds": 1.0}) + "\n")
    with pytest.raises(ValueError, match="rounds \\[1\\] carry no client_cpu_seconds"):
        federated_client_cpu_seconds(tmp_path)


def test_config_rejects_unknown_keys_and_bad_budgets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\noptim: sgd\n")
    with pytest.raises(ValueError, match="unknown config key"):
        CentralizedConfig.from_yaml(path)
    with pytest.raises(ValueError, match="budget_cpu_seconds"):
        CentralizedConfig(budget_cpu_seconds=0)
    assert CentralizedConfig.from_yaml(None, ["budget_cpu_seconds=2.5"]).budget_cpu_seconds == 2.5
    with pytest.raises(ValueError, match="unknown config key"):  # the wall-clock budget is gone, not ignored
        CentralizedConfig.from_yaml(None, ["budget_minutes=2.5"])


@pytest.fixture
def data(tiny_clients, tiny_sets, tiny_tokens, tiny_stats, tiny_asr_config):
    bpemodel, token_list = tiny_tokens
    return dict(asr_config=tiny_asr_config, train_clients=tiny_clients, token_list=token_list, bpemodel=bpemodel,
                feats_stats=tiny_stats, dev_cuts=tiny_sets["dev-clean"], seed=3, num_threads=1)


@pytest.fixture
def short_epochs(monkeypatch):
    """Epochs of 2 batches; each validation's dev accuracy (WER) is the next of `script.accs`
    (`script.wers`; the test fills them, 0.0 (0.5) when empty), and `script.evaluated` counts
    the epochs validated."""
    real = centralized.make_dataloader
    monkeypatch.setattr(centralized, "make_dataloader", lambda *a, **k: list(itertools.islice(real(*a, **k), 2)))
    script = SimpleNamespace(accs=[], wers=[], evaluated=0)

    def evaluate(*args):
        script.evaluated += 1
        return {"loss": 1.0, "acc": script.accs.pop(0) if script.accs else 0.0, "wer": script.wers.pop(0) if script.wers else 0.5}

    monkeypatch.setattr(centralized, "evaluate", evaluate)
    return script


def test_federated_rounds_record_client_cpu_seconds_and_budget_from_spends_them(data, tmp_path):
    """fl_train's rows carry client_cpu_seconds; --budget_from sums them into budget_cpu_seconds,
    and the centralized run trains until its own process has spent that much CPU time."""
    from fl_lib.bin.train_centralized import main
    from fl_lib.fl.config import FLConfig
    from fl_lib.fl.train import train

    conf = FLConfig.from_yaml(CONF_DIR / "fl_fedavg.yaml",
                              ["rounds=2", "clients_per_round=2", "client.max_steps=2", "client.max_duration=15"])
    fl_dir = tmp_path / "fl"
    train(conf, output_dir=fl_dir, **{**data, "dev_cuts": None})
    rows = [json.loads(line) for line in (fl_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["client_cpu_seconds"] for r in rows)

    out = tmp_path / "central"
    main(["--asr_config", str(data["asr_config"]), "--train_clients", str(data["train_clients"]),
          "--token_list", str(data["token_list"]), "--bpemodel", str(data["bpemodel"]),
          "--feats_stats", str(data["feats_stats"]), "--budget_from", str(fl_dir), "--output_dir", str(out),
          "--num_threads", "1", "max_duration=15", "max_epoch=50"])
    budget = yaml.safe_load((out / "centralized_config.yaml").read_text())["budget_cpu_seconds"]
    assert budget == pytest.approx(federated_client_cpu_seconds(fl_dir), abs=1e-5)
    central = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert central[-1]["train_cpu_seconds"] >= budget and len(central) < 50  # stopped by the budget


def test_keeps_the_best_epochs_by_the_federated_criterion(data, short_epochs, tmp_path):
    """keep_checkpoints keeps the N best epochs by round_score (as fl_train keeps rounds), not the
    last N, so valid.acc.ave averages the same thing in both."""
    from fl_lib.asr.average import round_checkpoints, select_checkpoints

    short_epochs.accs += [0.5, 0.9, 0.1, 0.8, 0.2]
    train_centralized(CentralizedConfig(max_epoch=5, keep_checkpoints=2, max_duration=15.0), output_dir=tmp_path, **data)
    assert list(round_checkpoints(tmp_path)) == [2, 4]
    assert list(select_checkpoints(tmp_path, None)) == [2, 4]
    assert (tmp_path / "valid.acc.best.pth").read_bytes() == (tmp_path / "2epoch.pth").read_bytes()


def test_best_criterion_wer_keeps_the_lowest_dev_wer_epochs_and_must_match_the_federated_run(data, short_epochs, tmp_path):
    """A federated run with best_criterion wer keeps its rounds by dev WER; its reference must too."""
    from fl_lib.asr.average import round_checkpoints
    from fl_lib.bin.train_centralized import main

    short_epochs.accs += [0.5, 0.9, 0.1, 0.8]  # by accuracy the best would be 2 and 4
    short_epochs.wers += [0.3, 0.6, 0.2, 0.7]
    rows = train_centralized(CentralizedConfig(max_epoch=4, keep_checkpoints=2, max_duration=15.0, best_criterion="wer"),
                             output_dir=tmp_path / "ref", **data)
    assert [r["dev_score"] for r in rows] == [-0.3, -0.6, -0.2, -0.7]
    assert list(round_checkpoints(tmp_path / "ref")) == [1, 3]
    assert (tmp_path / "ref/valid.acc.best.pth").read_bytes() == (tmp_path / "ref/3epoch.pth").read_bytes()

    fl = tmp_path / "fl"
    fl.mkdir()
    (fl / "fl_config.yaml").write_text("best_criterion: wer\n")
    (fl / "metrics.jsonl").write_text(json.dumps({"round": 1, "client_cpu_seconds": 5.0}) + "\n")
    argv = [str(a) for a in ["--asr_config", data["asr_config"], "--train_clients", data["train_clients"],
                             "--token_list", data["token_list"], "--bpemodel", data["bpemodel"],
                             "--budget_from", fl, "--output_dir", tmp_path / "cli"]]
    with pytest.raises(SystemExit, match=f"{fl} ranks its rounds by best_criterion wer, this reference by acc: give best_criterion=wer"):
        main(argv)
    assert not (tmp_path / "cli").exists()
    with pytest.raises(ValueError, match="best_criterion must be one of"):
        CentralizedConfig(best_criterion="cer")


def test_a_rerun_resumes_bitwise_and_refuses_another_experiment(data, short_epochs, tmp_path):
    """A rerun into the same dir continues from the last completed epoch (model, Adam, WarmupLR,
    RNG, budget spent, epoch count): bitwise the uninterrupted run's weights."""
    short_epochs.accs += [0.1, 0.2, 0.1, 0.2, 0.2]
    conf = CentralizedConfig(max_epoch=2, max_duration=15.0, warmup_steps=2)
    straight = train_centralized(conf, output_dir=tmp_path / "straight", **data)
    first = train_centralized(CentralizedConfig(max_epoch=1, max_duration=15.0, warmup_steps=2),
                              output_dir=tmp_path / "resumed", **data)
    resumed = train_centralized(conf, output_dir=tmp_path / "resumed", **data)  # max_epoch may grow on resume
    assert short_epochs.evaluated == 4  # 2 + 1 + 1: the rerun trained epoch 2 only, not epoch 1 again
    assert [r["epoch"] for r in resumed] == [1, 2] and resumed[0] == first[0]
    assert [r["steps"] for r in resumed] == [r["steps"] for r in straight]
    assert resumed[1]["train_cpu_seconds"] > resumed[0]["train_cpu_seconds"] == first[0]["train_cpu_seconds"]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    assert [json.loads(line)["epoch"] for line in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()] == [1, 2]
    a = torch.load(tmp_path / "straight/latest.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed/latest.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A finished run reruns as a no-op.
    assert train_centralized(conf, output_dir=tmp_path / "resumed", **data) == resumed and short_epochs.evaluated == 4
    # A damaged checkpoint.pth: epoch 2 is redone from the previous checkpoint, to the same weights.
    ckpt = tmp_path / "resumed/checkpoint.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    redone = train_centralized(conf, output_dir=tmp_path / "resumed", **data)
    assert short_epochs.evaluated == 5 and redone[0] == resumed[0] and redone[1]["steps"] == resumed[1]["steps"]
    assert (tmp_path / "resumed/checkpoint.damaged.pth").stat().st_size == 1000
    b = torch.load(tmp_path / "resumed/latest.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)

    before = (tmp_path / "resumed/centralized_config.yaml").read_text()
    with pytest.raises(CheckpointError, match="belongs to another experiment: lr differ"):
        train_centralized(CentralizedConfig(max_epoch=2, max_duration=15.0, warmup_steps=2, lr=1e-3),
                          output_dir=tmp_path / "resumed", **data)
    with pytest.raises(CheckpointError, match="belongs to another experiment: seed differ"):
        train_centralized(conf, output_dir=tmp_path / "resumed", **{**data, "seed": 4})
    assert (tmp_path / "resumed/centralized_config.yaml").read_text() == before  # nothing rewritten
    # The checkpoint is read weights-only: one that names a callable is refused, never unpickled.
    torch.save({"epoch": 1, "evil": open}, tmp_path / "resumed/checkpoint.pth")
    with pytest.raises(CheckpointError, match="refused"):
        train_centralized(conf, output_dir=tmp_path / "resumed", **data)


def test_a_new_run_clears_stale_epoch_checkpoints(data, short_epochs, tmp_path):
    """<N>epoch.pth files of an earlier run (no checkpoint.pth to resume) never join the new run's average."""
    from fl_lib.asr.average import round_checkpoints, select_checkpoints

    short_epochs.accs += [0.5]
    torch.save({"w": torch.zeros(1)}, tmp_path / "7epoch.pth")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 7, "dev_acc": 0.99}) + "\n")
    train_centralized(CentralizedConfig(max_epoch=1, max_duration=15.0), output_dir=tmp_path, **data)
    assert list(round_checkpoints(tmp_path)) == [1] and list(select_checkpoints(tmp_path, None)) == [1]
