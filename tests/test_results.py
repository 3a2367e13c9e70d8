"""RESULTS.md generation from a well-formed experiment dir (no model needed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fl_lib.asr.decode import Hypothesis, write_outputs
from fl_lib.asr.results import client_stats, make_results

REPO = Path(__file__).resolve().parents[1]
METRICS = [
    {"round": 1, "train_loss": 9.0, "dev_loss": 8.0, "dev_acc": 0.30, "clients": ["s1", "s2"],
     "weights": [0.25, 0.75], "dropped": [], "lr": 1.0, "seconds": 30.0},
    {"round": 2, "train_loss": 7.0, "dev_loss": None, "dev_acc": None, "clients": ["s2", "s3"],
     "weights": [0.5, 0.5], "dropped": ["s1"], "failed": ["s4"], "lr": 1.0, "seconds": 30.0},
    {"round": 3, "train_loss": 5.0, "dev_loss": 6.0, "dev_acc": 0.55, "clients": ["s1", "s2"],
     "weights": [0.75, 0.25], "dropped": [], "lr": 1.0, "seconds": 60.0},
]


@pytest.fixture
def exp(tmp_path) -> Path:
    exp = tmp_path / "exp" / "fl_dga_rnn"
    exp.mkdir(parents=True)
    (exp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in METRICS))
    (exp / "asr_config.yaml").write_text("encoder: rnn\n")
    (exp / "fl_config.yaml").write_text("rounds: 3\nstrategy:\n  name: dga\n")
    info = {"model": "valid.acc.best.pth", "inference_config": {"beam_size": 8, "ctc_weight": 0.4}}
    for part, hyp in (("dev-clean", "TURN ON THE LIGHT"), ("test-clean", "")):
        hyps = [Hypothesis("spk1-0-0000", "spk1", "TURN ON THE LIGHTS", hyp, 2.0, 0.2),
                Hypothesis("spk2-0-0000", "spk2", "OPEN THE DOOR", "OPEN THE DOOR", 1.6, 0.1)]
        write_outputs(hyps, exp / "decode_valid.acc.best" / part, info)
    return exp


def test_client_stats():
    stats = {c.client: c for c in client_stats(METRICS)}
    assert (stats["s1"].rounds, stats["s1"].mean_weight, stats["s1"].dropped) == (2, 0.5, 1)
    assert (stats["s2"].rounds, stats["s2"].mean_weight) == (3, 0.5)
    assert (stats["s3"].rounds, stats["s3"].dropped) == (1, 0)
    assert (stats["s4"].rounds, stats["s4"].failed) == (0, 1)
    with pytest.raises(ValueError, match="2 clients but 1 weights"):
        client_stats([{**METRICS[0], "weights": [1.0]}])


def test_make_results_cli(exp):
    subprocess.run([sys.executable, "-m", "fl_lib.bin.make_results", "--exp_dir", str(exp),
                    "--decode_dir", str(exp / "decode_valid.acc.best")], check=True, cwd=REPO)
    text = (exp / "RESULTS.md").read_text()
    png = exp / "images" / "dev_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![dev loss, accuracy and WER per round](images/dev_curve.png)" in text
    for needle in ("# RESULTS", "## Environments", "- pytorch version: `pytorch ", "- espnet version: `espnet ",
                   "- lhotse version:", "- Git hash:", "encoder: rnn", "name: dga", "### WER", "### CER",
                   "|dataset|Snt|Wrd|Corr|Sub|Del|Ins|Err|S.Err|",
                   # dev: 7 words, one substitution (LIGHTS->LIGHT); test: first hypothesis empty
                   "|decode_valid.acc.best/dev-clean|2|7|85.7|14.3|0.0|0.0|14.3|50.0|",
                   "|decode_valid.acc.best/test-clean|2|7|42.9|0.0|57.1|0.0|57.1|50.0|",
                   "#### decode_valid.acc.best/test-clean", "|spk1|1|4|0.0|0.0|100.0|0.0|100.0|100.0|",
                   "|client|rounds|mean weight|dropped|failed|", "|s1|2|0.5000|1|0|", "|s4|0|0.0000|0|1|",
                   "best dev accuracy: 0.5500 (round 3)", "rounds: 3, training time: 2.0 min"):
        assert needle in text, needle


def test_missing_inputs_are_clear(exp, tmp_path):
    with pytest.raises(FileNotFoundError, match="run decoding first"):
        make_results(exp, [tmp_path / "nothing"])
    (exp / "fl_config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="fl_config.yaml missing"):
        make_results(exp, [exp / "decode_valid.acc.best"])


def test_dev_curve_has_an_accuracy_panel_only_when_the_model_reports_accuracy():
    from fl_lib.asr.results import dev_curve_figure

    rows = [{"round": r, "train_loss": 5.0 - r, "dev_loss": 6.0 - r, "dev_acc": None, "dev_wer": 0.9 - 0.1 * r} for r in (1, 2)]
    assert [ax.get_ylabel() for ax in dev_curve_figure(rows).axes] == ["loss", "dev WER % (CTC greedy)"]
    rows[1]["dev_acc"] = 0.4
    assert [ax.get_ylabel() for ax in dev_curve_figure(rows).axes] == ["loss", "dev accuracy", "dev WER % (CTC greedy)"]


def test_compute_lines_give_the_client_cpu_minutes_and_the_reference_budget(tmp_path):
    """The compute line of RESULTS.md: a federated run's client CPU-seconds summed over rounds, and a
    centralized reference's own CPU time against the budget it was given (hand values)."""
    from fl_lib.asr.results import compute_lines

    fl = [{"round": 1, "client_cpu_seconds": 90.0}, {"round": 2, "client_cpu_seconds": 150.0}]
    assert compute_lines(tmp_path, fl)[0].startswith("- training compute: 4.0 client CPU-minutes")
    assert compute_lines(tmp_path, [{"round": 1, "seconds": 3.0}]) == []  # older than the CPU-second budget
    central = [{"epoch": 1, "train_cpu_seconds": 100.0}, {"epoch": 2, "train_cpu_seconds": 246.0}]
    assert compute_lines(tmp_path, central) == ["- training compute: 4.1 CPU-minutes of its one process (time.process_time, training only)"]
    (tmp_path / "centralized_config.yaml").write_text("budget_cpu_seconds: 240.0\n")
    assert compute_lines(tmp_path, central)[0].startswith("- training compute: 4.1 CPU-minutes of its one process "
                                                          "(time.process_time, training only), budget 4.0: the federated run's")
