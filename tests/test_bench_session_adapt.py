"""bench/session_adapt_table.py: the variants' table read from records, seeds matched."""
from __future__ import annotations

import json

import pytest

from conftest import bench_module

table_mod = bench_module("session_adapt_table")


def write_seed(root, seed, dev_wers, lm, am, seed_model=None):
    d = root / f"seed{seed}"
    d.mkdir(parents=True)
    rows = [{"round": 5 * (i + 1), "dev_wer": w} for i, w in enumerate(dev_wers)] + [{"round": 99, "dev_wer": None}]
    (d / "fl_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    decodings = {"LM fusion (decode_asr_ctc_fusion_lm)": {"pooled_werr": lm}, "acoustic model alone": {"pooled_werr": am}}
    summary = {"exp_dir": str(d), "decodings": decodings}
    if seed_model:
        summary["seed"] = {"model_sha256": seed_model, "lm_sha256": None}
    (d / "summary.json").write_text(json.dumps(summary))


def test_table_gives_best_dev_and_the_t_interval_over_seeds(tmp_path):
    write_seed(tmp_path / "a", 1, [0.5, 0.3, 0.4], 10.0, 30.0)
    write_seed(tmp_path / "a", 2, [0.6, 0.5], 20.0, 40.0)
    text = table_mod.table({"a": tmp_path / "a"})
    cells = [c.strip() for c in text.splitlines()[2].strip("|").split("|")]
    # mean 15 (LM) and 35 (AM), sd 7.07, t(0.975, 1) = 12.706: half width 12.706 * 7.071 / sqrt(2) = 63.5
    assert cells == ["a", "30.0 (10) / 50.0 (10)", "40.0", "10.0 / 20.0", "15.0 ± 63.5", "30.0 / 40.0", "35.0 ± 63.5"]


def test_table_refuses_variants_with_other_seeds(tmp_path):
    write_seed(tmp_path / "a", 1, [0.5], 1.0, 2.0)
    write_seed(tmp_path / "a", 2, [0.5], 1.0, 2.0)
    write_seed(tmp_path / "b", 1, [0.5], 1.0, 2.0)
    with pytest.raises(ValueError, match="compare like with like"):
        table_mod.table({"a": tmp_path / "a", "b": tmp_path / "b"})


def test_decodings_are_found_by_their_whole_name_not_a_prefix(tmp_path):
    """An extra 'acoustic model alone, tuned' or a second LM-fused decoding is ambiguous, not silently
    the first match; the LM-fused one is found whatever decoding config it names."""
    summary = {"exp_dir": "x", "decodings": {"LM fusion (decode_k2_tuned)": {"pooled_werr": 3.0},
                                             "acoustic model alone": {"pooled_werr": 1.0},
                                             "acoustic model alone, tuned": {"pooled_werr": 2.0}}}
    assert table_mod.pooled_werr(summary, table_mod.LM) == 3.0 and table_mod.pooled_werr(summary, table_mod.AM) == 1.0
    summary["decodings"]["LM fusion (decode_other)"] = {"pooled_werr": 4.0}
    with pytest.raises(ValueError, match="2 decodings named"):
        table_mod.pooled_werr(summary, table_mod.LM)


def test_table_names_variants_adapted_from_other_seed_models_or_unrecorded_ones(tmp_path):
    write_seed(tmp_path / "a", 1, [0.5], 1.0, 2.0, seed_model="aa" * 32)
    write_seed(tmp_path / "b", 1, [0.5], 1.0, 2.0, seed_model="aa" * 32)
    write_seed(tmp_path / "c", 1, [0.5], 1.0, 2.0, seed_model="cc" * 32)
    write_seed(tmp_path / "old", 1, [0.5], 1.0, 2.0)
    same = table_mod.table({"a": tmp_path / "a", "b": tmp_path / "b"})
    assert "different seed models" not in same and "not recorded" not in same
    text = table_mod.table({"a": tmp_path / "a", "b": tmp_path / "b", "c": tmp_path / "c", "old": tmp_path / "old"})
    assert f"different seed models (sha256 of exp/seed/model.pth): {'aa' * 8}: a, b; {'cc' * 8}: c." in text
    assert "so not checked to be the same: old." in text
