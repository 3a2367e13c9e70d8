"""Federated training on the tiny embedded corpus with a real ESPnet model.

Covers: a multi-round run per strategy, resume after `kill -9` (bitwise equal to
an uninterrupted run), dropping a NaN client, surviving a failing client, and
loading the result with ESPnet's stock `Speech2Text`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fl_lib.fl.config import FLConfig

FAST = ["clients_per_round=2", "client.max_steps=2", "client.max_duration=15", "keep_checkpoints=2", "validate_every=1"]
CONF_DIR = Path(__file__).resolve().parents[1] / "egs/librispeech_fl/conf"


@pytest.fixture(scope="module")
def fl_data(tiny_clients, tiny_sets, tiny_tokens, tiny_stats, tiny_asr_config):
    bpemodel, token_list = tiny_tokens
    return dict(
        asr_config=tiny_asr_config,
        train_clients=tiny_clients,
        dev_cuts=tiny_sets["dev-clean"],
        token_list=token_list,
        bpemodel=bpemodel,
        feats_stats=tiny_stats,
    )


def run_inprocess(fl_data, out: Path, conf_name: str, overrides=(), **kw):
    from fl_lib.fl.train import train

    conf = FLConfig.from_yaml(CONF_DIR / conf_name, [*FAST, *overrides])
    return train(conf, output_dir=out, **{"seed": 7, **fl_data, **kw})


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("conf_name", ["fl_dga.yaml", "fl_fedavg.yaml", "fl_bmuf.yaml", "fl_fedprox.yaml"])
def test_two_rounds_each_strategy(fl_data, tmp_path, conf_name):
    run_inprocess(fl_data, tmp_path, conf_name, ["rounds=2"])
    rows = metrics(tmp_path)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert len(r["clients"]) == 2 and not r["dropped"] and not r["failed"]
        assert sum(r["weights"]) == pytest.approx(1.0)
        assert r["train_loss"] > 0 and 0.0 <= r["dev_acc"] <= 1.0
    for name in ("config.yaml", "latest.pth", "valid.acc.best.pth", "1round.pth", "2round.pth", "checkpoint.pth"):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    start = torch.load(tmp_path / "1round.pth")
    end = torch.load(tmp_path / "2round.pth")
    assert any(not torch.equal(start[k], end[k]) for k in start if start[k].is_floating_point())


def test_resume_after_kill_is_bitwise_identical(fl_data, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = [
        sys.executable, "-m", "fl_lib.bin.fl_train",
        "--asr_config", fl_data["asr_config"], "--fl_config", CONF_DIR / "fl_dga.yaml",
        "--train_clients", fl_data["train_clients"], "--dev_cuts", fl_data["dev_cuts"],
        "--token_list", fl_data["token_list"], "--bpemodel", fl_data["bpemodel"],
        "--feats_stats", fl_data["feats_stats"], "--seed", "7", *FAST, "rounds=3",
    ]
    args = [str(a) for a in args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*args, "--output_dir", str(straight)], check=True, env=env, capture_output=True)

    proc = subprocess.Popen([*args, "--output_dir", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.pth"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the run never reached its first checkpoint"
    done = torch.load(ckpt, weights_only=False)["round"]
    assert done < 3, "the run finished before it could be killed; nothing was resumed"

    (killed / ".latest.pth.tmp99999").write_bytes(b"half-written")  # what a kill during atomic_save leaves
    resumed = subprocess.run([*args, "--output_dir", str(killed)], check=True, env=env, capture_output=True, text=True)
    assert not list(killed.glob(".*.tmp*"))
    assert f"resumed from {ckpt}: {done} of 3 rounds done" in resumed.stderr
    a, b = torch.load(straight / "latest.pth"), torch.load(killed / "latest.pth")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["round"] for r in metrics(killed)] == [1, 2, 3]
    assert [r["clients"] for r in metrics(killed)] == [r["clients"] for r in metrics(straight)]


def test_resume_refuses_another_experiment(fl_data, tmp_path):
    """Another seed or federated config in the same output_dir is an error, raised before any file there is rewritten."""
    run_inprocess(fl_data, tmp_path, "fl_fedavg.yaml", ["rounds=1"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="belongs to another experiment: seed differ"):
        run_inprocess(fl_data, tmp_path, "fl_fedavg.yaml", ["rounds=2"], seed=8)
    with pytest.raises(ValueError, match="client differ"):
        run_inprocess(fl_data, tmp_path, "fl_fedavg.yaml", ["rounds=2", "client.lr=0.01"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_parallel_client_jobs_match_serial_bitwise(fl_data, tmp_path):
    serial = run_inprocess(fl_data, tmp_path / "serial", "fl_dga.yaml", ["rounds=1"])
    parallel = run_inprocess(fl_data, tmp_path / "parallel", "fl_dga.yaml", ["rounds=1"], client_jobs=2)
    assert metrics(tmp_path / "serial")[0]["weights"] == metrics(tmp_path / "parallel")[0]["weights"]
    assert all(torch.equal(serial.global_state[k], parallel.global_state[k]) for k in serial.global_state)


def test_nan_client_is_dropped_and_failing_client_reported(fl_data, tmp_path, caplog):
    """One client's audio is NaN (non-finite loss), another's manifest is missing (exception)."""
    from fl_lib.data.clients import load_clients

    clients = load_clients(fl_data["train_clients"])
    nan_id, broken_id = clients[0].id, clients[1].id
    listing = tmp_path / "clients.jsonl"
    with open(listing, "w") as f:
        for c in clients:
            manifest = c.manifest
            if c.id == nan_id:
                manifest = _nan_audio_manifest(c.manifest, tmp_path / "nan.jsonl.gz")
            elif c.id == broken_id:
                manifest = tmp_path / "missing.jsonl.gz"
            f.write(json.dumps({"id": c.id, "num_cuts": c.num_cuts, "duration": c.duration, "manifest": str(manifest)}) + "\n")
    out = tmp_path / "exp"
    n = len(clients)
    run_inprocess({**fl_data, "train_clients": listing}, out, "fl_fedavg.yaml", ["rounds=1", f"clients_per_round={n}"])
    (row,) = metrics(out)
    assert row["dropped"] == [nan_id]
    assert row["failed"] == [broken_id]
    assert sorted(row["clients"]) == sorted(c.id for c in clients if c.id not in (nan_id, broken_id))
    assert f"client {broken_id} failed" in caplog.text


def test_all_clients_dropped_leaves_model_unchanged(fl_data, tmp_path, caplog):
    from fl_lib.data.clients import load_clients

    clients = load_clients(fl_data["train_clients"])[:2]
    listing = tmp_path / "clients.jsonl"
    listing.write_text("".join(
        json.dumps({"id": c.id, "num_cuts": c.num_cuts, "duration": c.duration, "manifest": str(tmp_path / "missing.jsonl.gz")}) + "\n"
        for c in clients
    ))
    server = run_inprocess({**fl_data, "train_clients": listing}, tmp_path / "exp", "fl_dga.yaml", ["rounds=1"])
    assert "the model stays unchanged" in caplog.text
    init = torch.load(tmp_path / "exp" / "1round.pth")
    assert metrics(tmp_path / "exp")[0]["clients"] == []
    assert all(torch.equal(init[k], server.global_state[k]) for k in init)


def _nan_audio_manifest(src: Path, dst: Path) -> Path:
    """A copy of a client's cuts whose audio is all NaN (float WAV: FLAC cannot hold NaN)."""
    from dataclasses import replace

    import numpy as np
    import soundfile as sf
    from lhotse import CutSet, Recording, load_manifest_lazy

    cuts = []
    for i, cut in enumerate(load_manifest_lazy(src)):
        wav = dst.parent / f"nan{i}.wav"
        sf.write(wav, np.full(cut.recording.num_samples, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
        cuts.append(replace(cut, recording=Recording.from_file(wav, recording_id=cut.recording_id)))
    CutSet.from_cuts(cuts).to_file(dst)
    return dst


def test_stock_speech2text_loads_and_decodes(fl_data, tmp_path, tiny_sets):
    from lhotse import load_manifest_lazy

    from fl_lib.espnet_env import quiet_nltk

    run_inprocess(fl_data, tmp_path, "fl_fedavg.yaml", ["rounds=1"])
    quiet_nltk()
    from espnet2.bin.asr_inference import Speech2Text

    s2t = Speech2Text(asr_train_config=str(tmp_path / "config.yaml"), asr_model_file=str(tmp_path / "valid.acc.best.pth"), beam_size=2, maxlenratio=0.3)
    cut = next(iter(load_manifest_lazy(tiny_sets["test-clean"])))
    (text, tokens, token_ids, _hyp), *_ = s2t(torch.from_numpy(cut.load_audio()[0]))
    assert isinstance(text, str) and len(token_ids) == len(tokens)
    saved, loaded = torch.load(tmp_path / "valid.acc.best.pth"), s2t.asr_model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)  # our weights, unchanged
