"""The centralized reference: ESPnet's Trainer on the pooled clients, capped by a training-time budget."""
from __future__ import annotations

import json

import pytest
import yaml

from fl_lib.asr.centralized import CentralizedConfig, _Budget, federated_training_minutes, pooled_cuts, train_centralized
from fl_lib.data.clients import load_clients


def test_pooled_cuts_hold_every_client_utterance_once(tiny_clients):
    pooled = pooled_cuts(tiny_clients)
    ids = [c.id for c in pooled]
    assert len(ids) == len(set(ids)) == sum(c.num_cuts for c in load_clients(tiny_clients))


def test_budget_stops_the_batch_stream():
    budget = _Budget(seconds=0.0)
    assert list(budget.iterate(range(5))) == []
    budget = _Budget(seconds=None)
    assert list(budget.iterate(range(5))) == list(range(5)) and not budget.exhausted()


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
    for name in ("config.yaml", "latest.pth", "valid.acc.best.pth", "2epoch.pth", "centralized_config.yaml"):
        assert (tmp_path / name).is_file(), name
    assert yaml.safe_load((tmp_path / "centralized_config.yaml").read_text())["max_epoch"] == 2
    Speech2Text(asr_train_config=tmp_path / "config.yaml", asr_model_file=tmp_path / "valid.acc.best.pth")


def test_budget_from_a_federated_run(tmp_path):
    rows = [{"round": 1, "train_seconds": 30.0, "seconds": 40.0}, {"round": 2, "train_seconds": 90.0, "seconds": 95.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert federated_training_minutes(tmp_path) == 2.0
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1, "seconds": 1.0}) + "\n")
    with pytest.raises(ValueError, match="train_seconds"):
        federated_training_minutes(tmp_path)


def test_config_rejects_unknown_keys_and_bad_budgets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\noptim: sgd\n")
    with pytest.raises(ValueError, match="unknown config key"):
        CentralizedConfig.from_yaml(path)
    with pytest.raises(ValueError, match="budget_minutes"):
        CentralizedConfig(budget_minutes=0)
    assert CentralizedConfig.from_yaml(None, ["budget_minutes=2.5"]).budget_minutes == 2.5
