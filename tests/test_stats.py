"""Stage 3: federated feature statistics equal the central ones and load into ESPnet's GlobalMVN."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
import yaml
from lhotse import load_manifest_lazy

from fl_lib.bin.compute_feats_stats import main as compute_feats_stats_cli
from fl_lib.data.clients import load_clients, safe_file_name
from fl_lib.data.dataset import load_speech
from fl_lib.features.stats import (
    FeatsStats,
    build_frontend,
    federated_feats_stats,
    utterance_feats,
)


@pytest.fixture(scope="module")
def central_feats(tiny_clients, tiny_asr_config) -> np.ndarray:
    """All frames of all clients' audio in one array, as a central server would see them."""
    frontend = build_frontend(tiny_asr_config)
    feats = [
        utterance_feats(load_speech(cut), frontend)
        for client in load_clients(tiny_clients)
        for cut in load_manifest_lazy(client.manifest)
    ]
    return np.concatenate(feats).astype(np.float64)


def test_federated_equals_espnet_collect_stats(tiny_stats, tiny_clients, tiny_asr_config, tiny_tokens, tmp_path):
    """ESPnet's own statistics collection (asr.sh stage 10: `collect_stats` over the model's
    `collect_feats`) on all clients' audio pooled gives the federated sum of per-client statistics."""
    from espnet2.main_funcs.collect_stats import collect_stats

    from fl_lib.asr.model import build_asr_args, build_asr_model
    from fl_lib.data.dataset import make_dataloader
    from fl_lib.data.tokenizer import Tokenizer

    bpemodel, token_list = tiny_tokens
    args = build_asr_args(tiny_asr_config, token_list, bpemodel, tiny_stats)
    args.normalize = None  # ESPnet collects statistics before any exist
    model = build_asr_model(args).eval()
    tokenizer = Tokenizer(bpemodel, token_list)
    # One utterance per batch: padding a batch changes the STFT's reflect-padded last frames.
    pooled = [b for c in load_clients(tiny_clients) for b in make_dataloader(c.manifest, tokenizer, max_cuts=1)]
    # ESPnet also collects a valid set; one batch is enough, only train/ is compared.
    collect_stats(model=model, train_iter=pooled, valid_iter=pooled[:1], output_dir=tmp_path, ngpu=0, log_interval=None, write_collected_feats=False)
    espnet, federated = FeatsStats.load(tmp_path / "train" / "feats_stats.npz"), FeatsStats.load(tiny_stats)
    assert federated.count == espnet.count > 0
    np.testing.assert_allclose(federated.sum, espnet.sum, rtol=1e-5)
    np.testing.assert_allclose(federated.sum_square, espnet.sum_square, rtol=1e-5)


def test_client_files_sum_to_total(tiny_stats, tiny_clients):
    ids = [c.id for c in load_clients(tiny_clients)]
    parts = [FeatsStats.load(tiny_stats.parent / "clients" / f"{i}.npz") for i in ids]
    total = sum(parts[1:], parts[0])
    expected = FeatsStats.load(tiny_stats)
    assert total.count == expected.count
    np.testing.assert_array_equal(total.sum, expected.sum)
    assert len(ids) > 1


def test_espnet_format(tiny_stats, tiny_asr_config):
    n_mels = yaml.safe_load(tiny_asr_config.read_text())["frontend_conf"]["n_mels"]
    with np.load(tiny_stats) as npz:
        assert set(npz.files) == {"count", "sum", "sum_square"}
        assert npz["count"].shape == () and npz["count"].dtype.kind == "i"
        assert npz["sum"].shape == npz["sum_square"].shape == (n_mels,)


def test_global_mvn_normalizes(tiny_stats, central_feats):
    """ESPnet's GlobalMVN loads the file and maps the training frames to mean 0, std 1."""
    from fl_lib.espnet_env import quiet_nltk

    quiet_nltk()
    from espnet2.layers.global_mvn import GlobalMVN

    mvn = GlobalMVN(stats_file=tiny_stats)
    x = torch.from_numpy(central_feats).float()[None]
    y, _ = mvn(x, torch.tensor([x.shape[1]]))
    np.testing.assert_allclose(y[0].mean(0).numpy(), 0.0, atol=1e-3)
    np.testing.assert_allclose(y[0].std(0, unbiased=False).numpy(), 1.0, atol=1e-3)


def test_rerun_is_safe(tiny_stats, tiny_clients, tiny_asr_config):
    mtime = tiny_stats.stat().st_mtime_ns
    assert federated_feats_stats(tiny_clients, tiny_asr_config, tiny_stats.parent) == tiny_stats
    assert tiny_stats.stat().st_mtime_ns == mtime


def test_changed_inputs_are_recomputed(tiny_stats, tiny_clients, tiny_asr_config, tmp_path, caplog):
    """Other client cuts (same clients.jsonl) or another frontend: old client sums are dropped, not mixed in."""
    out, clients_dir = tmp_path / "stats", tmp_path / "clients"
    shutil.copytree(tiny_stats.parent, out)
    shutil.copytree(tiny_clients.parent, clients_dir)
    clients = clients_dir / tiny_clients.name
    stats = out / tiny_stats.name
    mtime = stats.stat().st_mtime_ns
    assert federated_feats_stats(clients, tiny_asr_config, out) == stats  # a copy of the same inputs
    assert stats.stat().st_mtime_ns == mtime

    a, b = load_clients(clients)[:2]
    a.manifest.write_bytes(b.manifest.read_bytes())  # a re-run of stage 2 changed a's cuts only
    caplog.set_level(logging.INFO)
    federated_feats_stats(clients, tiny_asr_config, out)
    assert "other clients or another frontend" in caplog.text and "recomputing" in caplog.text
    count_a, count_b = (FeatsStats.load(tiny_stats.parent / "clients" / f"{c.id}.npz").count for c in (a, b))
    assert FeatsStats.load(stats).count == FeatsStats.load(tiny_stats).count - count_a + count_b

    other = tmp_path / "asr.yaml"
    config = yaml.safe_load(tiny_asr_config.read_text())
    config["frontend_conf"]["n_mels"] = 40
    other.write_text(yaml.safe_dump(config))
    assert FeatsStats.load(federated_feats_stats(clients, other, out)).sum.shape == (40,)


def test_client_ids_that_are_not_file_names(tiny_stats, tiny_clients, tiny_asr_config, tmp_path):
    """Client stats files get the same safe names as the client manifests of stage 2."""
    first = load_clients(tiny_clients)[0]
    clients = tmp_path / "clients.jsonl"
    row = {"num_cuts": first.num_cuts, "duration": first.duration, "manifest": str(first.manifest)}
    clients.write_text("".join(json.dumps({"id": i, **row}) + "\n" for i in ("../up", "a/b")))
    out = tmp_path / "stats"
    total = FeatsStats.load(federated_feats_stats(clients, tiny_asr_config, out))
    files = sorted(p.name for p in (out / "clients").iterdir())
    assert files == sorted(f"{safe_file_name(i)}.npz" for i in ("../up", "a/b")) and not (out / "up.npz").exists()
    assert total.count == 2 * FeatsStats.load(tiny_stats.parent / "clients" / f"{first.id}.npz").count


def test_cli_resumes_partial_run(tiny_stats, tiny_clients, tiny_asr_config, tmp_path):
    """A run that died after some clients recomputes only the missing ones."""
    first = load_clients(tiny_clients)[0]
    kept = tmp_path / "clients" / f"{first.id}.npz"
    kept.parent.mkdir()
    kept.write_bytes((tiny_stats.parent / "clients" / f"{first.id}.npz").read_bytes())
    mtime = kept.stat().st_mtime_ns
    argv = ["--clients", str(tiny_clients), "--asr_config", str(tiny_asr_config)]
    compute_feats_stats_cli([*argv, "--output_dir", str(tmp_path)])
    assert kept.stat().st_mtime_ns == mtime
    got, expected = FeatsStats.load(tmp_path / "feats_stats.npz"), FeatsStats.load(tiny_stats)
    assert got.count == expected.count
    np.testing.assert_allclose(got.sum_square, expected.sum_square, rtol=1e-12)


def test_dims_must_match():
    a = FeatsStats(1, np.zeros(80), np.zeros(80))
    with pytest.raises(ValueError, match="feature dims"):
        a + FeatsStats(1, np.zeros(40), np.zeros(40))
