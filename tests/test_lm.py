"""The decoding LM: ESPnet's LM trainer on external text (stage 4), shallow fusion in stage 6."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_lm_config, train_lm_cli

from fl_lib.asr.decode import with_lm
from fl_lib.asr.lm import prepare_lm_text

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "egs/librispeech_fl/conf"


def test_train_lm_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/model.pth").write_text("not ours")
    (tmp_path / "t.txt").write_text("A B\n")
    (tmp_path / "tokens.txt").write_text("<blank>\n<unk>\nA\nB\n<sos/eos>\n")
    proc = train_lm_cli("--lm_config", CONF / "train_lm_rnn.yaml", "--text", tmp_path / "t.txt",
                        "--token_list", tmp_path / "tokens.txt", "--output_dir", tmp_path / "out")
    assert proc.returncode != 0 and "not written by fl_lib.bin.train_lm" in proc.stderr
    assert (tmp_path / "out/model.pth").read_text() == "not ours"


def test_prepare_lm_text_splits_counts_and_flags_foreign_characters(tmp_path, caplog):
    text = tmp_path / "lm.txt"
    text.write_text("TURN ON THE LIGHTS\n\n  OPEN   THE DOOR \n" + "CALL ONE\n" * 40 + "café au lait\n")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("\n".join(["<blank>", "<unk>", "<space>", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ", "<sos/eos>"]))
    train, valid = prepare_lm_text(text, tmp_path / "out", tokens, valid_fraction=0.2, seed=0)
    lines = train.read_text().splitlines() + valid.read_text().splitlines()
    assert len(lines) == 43  # the blank line is no sentence; nothing else is dropped
    assert "lm_00000001 OPEN THE DOOR" in lines  # whitespace normalized, ids in file order
    assert 0 < len(valid.read_text().splitlines()) < 20
    assert "1 of 43 LM sentences hold characters outside" in caplog.text
    again, _ = prepare_lm_text(text, tmp_path / "again", tokens, valid_fraction=0.2, seed=0)
    assert again.read_text() == train.read_text()  # seeded
    with pytest.raises(ValueError, match="needs both"):
        (tmp_path / "one.txt").write_text("A\n")
        prepare_lm_text(tmp_path / "one.txt", tmp_path / "o", tokens, valid_fraction=0.5, seed=0)


def test_an_lm_and_its_weight_go_together(tmp_path):
    config, model = tmp_path / "config.yaml", tmp_path / "lm.pth"
    config.write_text("x: 1\n")
    model.write_text("x")
    assert with_lm({"lm_weight": 0.0}, None, None) == {"lm_weight": 0.0}
    assert with_lm({"lm_weight": 2.0}, config, model)["lm_file"] == str(model)
    with pytest.raises(ValueError, match="lm_weight is 0"):
        with_lm({"lm_weight": 0.0}, config, model)
    with pytest.raises(ValueError, match="no LM is given"):
        with_lm({"lm_weight": 2.0}, None, None)
    with pytest.raises(ValueError, match="go together"):
        with_lm({"lm_weight": 2.0}, config, None)
    with pytest.raises(ValueError, match="does not exist"):
        with_lm({"lm_weight": 2.0}, config, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="given twice"):
        with_lm({"lm_weight": 2.0, "lm_file": str(model), "lm_train_config": str(config)}, config, model)


def test_train_lm_resumes_an_interrupted_run_and_retrains_on_new_text(tmp_path):
    """No .done (killed before the end): ESPnet's --resume continues, nothing is retrained.
    Other text: the directory is cleared and the LM trained again."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("\n".join(["<blank>", "<unk>", "<space>", *"ACDEHLNOPRT", "<sos/eos>"]) + "\n")
    text = tmp_path / "lm.txt"
    text.write_text("OPEN THE DOOR\nTURN ON THE LIGHT\nCLOSE THE DOOR\n" * 30)
    out = tmp_path / "lm"
    args = ["--lm_config", tiny_lm_config(tmp_path), "--text", text, "--token_list", tokens, "--output_dir", out]
    assert train_lm_cli(*args).returncode == 0
    epoch = (out / "2epoch.pth").stat().st_mtime_ns
    (out / ".done").unlink()
    resumed = train_lm_cli(*args)
    assert resumed.returncode == 0 and "training again" not in resumed.stderr
    assert (out / "2epoch.pth").stat().st_mtime_ns == epoch and (out / ".done").is_file()
    text.write_text("OPEN THE DOOR\n" * 90)
    again = train_lm_cli(*args)
    assert again.returncode == 0 and "trained from other inputs or settings: training again" in again.stderr
    assert (out / "2epoch.pth").stat().st_mtime_ns != epoch
    assert "TURN" not in (out / "data/train.txt").read_text()
