"""End-to-end smoke test of egs/session_adapt/run.sh (stages 0-8) on tiny settings.

The seed comes from a tiny run of the librispeech_fl recipe, as a user's would.
A second run from a corpus whose session transcripts are garbage must give the
same adapted model: stages 1-7 never read the adaptation truth.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "egs/session_adapt"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run(cmd, cwd=RECIPE):
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    return proc, proc.stdout + proc.stderr


@pytest.mark.parametrize("script,num_options", [("run.sh", 30), ("ablation.sh", 6), ("confidence_dev.sh", 8)])
def test_help_lists_every_option_with_its_default(script, num_options):
    head = (RECIPE / script).read_text().split("help_message=", 1)[0]
    defaults = [(n, v.strip('"')) for n, v in re.findall(r'^([a-z_]+)=("[^"]*"|\S*)', head, re.M)]
    proc, _ = run([f"./{script}", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert len(defaults) == num_options
    for name, value in defaults:
        line = re.search(rf"^  --{name} .*$", proc.stderr, re.M)
        assert line, name
        assert line.group(0).endswith(f'(default="{value}")'), line.group(0)


@pytest.fixture(scope="module")
def seed_exp(tmp_path_factory) -> Path:
    """A tiny seed from the librispeech_fl recipe (stages 0-5), trained just enough to emit characters,
    with the recipe's decoding LM (stage 4) beside it in exp/lm_train_lm_rnn."""
    tmp = tmp_path_factory.mktemp("seed")
    proc, out = run(["./run.sh", "--stage", "0", "--stop_stage", "5", "--corpus_config", "conf/corpus_tiny.yaml",
                     "--min_utts", "1", "--data", str(tmp / "data"), "--exp", str(tmp / "exp"), "--tag", "seed",
                     "--client_jobs", "1", "--fl_args", SEED_FL_ARGS],
                    cwd=REPO / "egs/librispeech_fl")
    assert proc.returncode == 0, out[-4000:]
    return tmp / "exp/seed"


SEED_FL_ARGS = "rounds=3 clients_per_round=4 client.max_steps=25 client.lr=0.004 client.max_duration=15"
ADAPT = ["--corpus_config", "conf/corpus_tiny.yaml", "--nj", "1", "--client_jobs", "1",
         "--adapt_config", "conf/adapt_k2_lm.yaml",
         "--fl_args", "rounds=2 client.max_steps=2", "--seed_model", "latest.pth"]


def test_missing_seed_fails_before_any_decoding(tmp_path):
    proc, out = run(["./run.sh", "--stage", "3", "--stop_stage", "8", "--seed_exp", str(tmp_path / "none"),
                     "--data", str(tmp_path / "data"), "--exp", str(tmp_path / "exp")])
    assert proc.returncode != 0
    assert "Stage 4" not in out
    assert "config.yaml missing" in out and "cd ../librispeech_fl && ./run.sh --stage 0 --stop_stage 5" in out


def test_later_generations_are_never_adapted_on_an_older_teachers_labels(tmp_path):
    """With 2 generations, starting after stage 4 would skip generation 2's labelling by the model
    this run trains again: refused before anything is written."""
    proc, out = run(["./run.sh", "--stage", "5", "--stop_stage", "7", "--seed_exp", str(tmp_path / "none"),
                     "--data", str(tmp_path / "data"), "--exp", str(tmp_path / "exp"), "--adapt_args", "generations=2"])
    assert proc.returncode != 0
    assert "2 generations: run from --stage 4" in out
    assert not (tmp_path / "exp").exists()


def test_session_adapt_stages_0_to_8_and_the_truth_is_never_read(seed_exp, tmp_path):
    data, exp = tmp_path / "data", tmp_path / "exp"
    proc, out = run(["./run.sh", "--stage", "0", "--stop_stage", "8", "--seed_exp", str(seed_exp),
                     "--data", str(data), "--exp", str(exp), "--tag", "smoke", *ADAPT])
    assert proc.returncode == 0, out[-4000:]
    for stage in range(9):
        assert f"Stage {stage}" in out
    assert "FALLING BACK" not in out  # the k2 environment ran stage 5
    sessions = [json.loads(line) for line in (data / "sessions/test-other/sessions.jsonl").read_text().splitlines()]
    assert len(sessions) == 3
    # Labels and test decoding with the seed recipe's LM (stage 3 imported it), and the n-gram of its text.
    labels = exp / "seed/decode_asr_ctc_fusion_lm/labels_test-other"
    assert json.loads((labels / "pseudo_label.json").read_text())["inference_config"]["lm_file"] == \
        str(exp / "seed/lm/model.pth")
    lm_text = (seed_exp.parent / "lm_train_lm_rnn/data/train.txt").read_text().splitlines()
    assert lm_text[0].split(" ", 1)[1] in (exp / "seed/lm/text.txt").read_text().splitlines()
    assert (exp / "smoke/gen1/confidence.G.txt").is_file()
    confidence = (exp / "smoke/gen1/confidence.jsonl").read_text().splitlines()
    assert {json.loads(line)["method"] for line in confidence} == {"k2_lm"}
    results = (exp / "smoke/RESULTS.md").read_text()
    assert "|session|adapt utts|test utts|seed WER|adapted WER|WERR %|" in results
    for s in sessions:
        assert f"|{s['id']}|{s['num_adapt']}|{s['num_test']}|" in results
    assert "WER kept" in results and "mean over sessions" not in results
    for decoding in ("LM fusion (decode_asr_ctc_fusion_lm)", "acoustic model alone"):
        assert f"### WER on the sessions' test parts: {decoding}" in results
    summary = json.loads((exp / "smoke/summary.json").read_text())
    assert summary["pseudo_labels"][0]["num_all"] == sum(s["num_adapt"] for s in sessions)
    # The default pulls towards the seed: the adapted model and its interpolations, chosen on the dev parts.
    trials = (exp / "smoke/gen1/fl/wiseft_dev_decode_asr_ctc_fusion_lm/trials.jsonl").read_text().splitlines()
    assert [json.loads(t)["model"] for t in trials] == \
        ["valid.acc.best.pth"] + [f"wiseft{a}_valid.acc.best.pth" for a in ("0.25", "0.5", "0.75")]
    assert summary["adapted_choice"]["model"] in [json.loads(t)["model"] for t in trials]
    assert summary["seed"] == {"model_sha256": hashlib.sha256((exp / "seed/model.pth").read_bytes()).hexdigest(),
                               "lm_sha256": hashlib.sha256((exp / "seed/lm/model.pth").read_bytes()).hexdigest()}

    # --tune_on_dev true: stage 7 decodes the kept rounds on the dev parts, stage 8 tunes the seed there
    # too and tests each with its choice (one LM weight: test_decode checks the choice among weights).
    proc, out = run(["./run.sh", "--stage", "7", "--stop_stage", "8", "--seed_exp", str(seed_exp), "--data", str(data),
                     "--exp", str(exp), "--tag", "smoke", *ADAPT, "--tune_on_dev", "true", "--tune_lm_weights", "3",
                     "--wiseft_alphas", ""])
    assert proc.returncode == 0, out[-4000:]
    fl = exp / "smoke/gen1/fl"
    kept = sorted(p.name for p in fl.glob("*round.pth"))
    for tune, models, tested in ((fl / "tune_dev_decode_asr_ctc_fusion_lm", kept, exp / "smoke"),
                                 (exp / "seed/tune_dev_decode_asr_ctc_fusion_lm/test-other", ["model.pth"], exp / "seed")):
        trials = [json.loads(line) for line in (tune / "trials.jsonl").read_text().splitlines()]
        assert sorted((t["model"], t["lm_weight"]) for t in trials) == [(m, 3.0) for m in models]
        choice = json.loads((tune / "choice.json").read_text())
        assert choice["errors"] == min(t["errors"] for t in trials)
        score = json.loads((tested / "decode_asr_ctc_fusion_lm_tuned/test-other/score.json").read_text())
        assert score["inference_config"]["lm_weight"] == choice["lm_weight"] and score["model"] == "model.pth"
    assert "### WER on the sessions' test parts: LM fusion (decode_asr_ctc_fusion_lm_tuned)" in (exp / "smoke/RESULTS.md").read_text()
    am = json.loads((exp / "smoke/decode_asr_ctc_tuned/test-other/score.json").read_text())
    assert am["model"] == "model.pth"  # the tuned choice, beside the untuned run's decode_asr_ctc/

    # --wiseft_alphas: stage 7 interpolates the adapted model with the seed, the dev parts choose
    # among the adapted model and the interpolations, and stage 8 tests the choice.
    proc, out = run(["./run.sh", "--stage", "7", "--stop_stage", "8", "--seed_exp", str(seed_exp), "--data", str(data),
                     "--exp", str(exp), "--tag", "smoke", *ADAPT, "--wiseft_alphas", "0 0.5"])
    assert proc.returncode == 0, out[-4000:]
    tune = fl / "wiseft_dev_decode_asr_ctc_fusion_lm"
    trials = [json.loads(line) for line in (tune / "trials.jsonl").read_text().splitlines()]
    assert [t["model"] for t in trials] == ["valid.acc.best.pth", "wiseft0_valid.acc.best.pth", "wiseft0.5_valid.acc.best.pth"]
    seed = torch.load(exp / "seed/model.pth", map_location="cpu")
    adapted = torch.load(fl / "valid.acc.best.pth", map_location="cpu")
    at0 = torch.load(fl / "wiseft0_valid.acc.best.pth", map_location="cpu")
    half = torch.load(fl / "wiseft0.5_valid.acc.best.pth", map_location="cpu")
    assert all(torch.equal(at0[k], seed[k]) for k in seed)  # share 0: the seed itself
    moved = [k for k in seed if seed[k].is_floating_point() and not torch.equal(seed[k], adapted[k])]
    assert moved
    for k in moved:
        assert torch.allclose(half[k], (seed[k] + adapted[k]) / 2, rtol=0, atol=1e-6)
    choice = json.loads((tune / "choice.json").read_text())
    assert choice["errors"] == min(t["errors"] for t in trials)
    chosen = torch.load(tune / "model.pth", map_location="cpu")
    assert all(torch.equal(chosen[k], torch.load(fl / choice["model"], map_location="cpu")[k]) for k in chosen)
    score_path = exp / "smoke/decode_asr_ctc_fusion_lm/test-other/score.json"
    assert json.loads(score_path.read_text())["model"] == "model.pth"  # the choice's copy
    assert score_path.stat().st_mtime > (tune / "choice.json").stat().st_mtime  # decoded after this choice
    assert f"- adapted model: `{choice['model']}`" in (exp / "smoke/RESULTS.md").read_text()

    # The same sessions with garbage transcripts: stages 1-7 must produce the same adapted model.
    garbage = tmp_path / "garbage/LibriSpeech"
    shutil.copytree(data / "corpus/LibriSpeech", garbage)
    for trans in (garbage / "test-other").rglob("*.trans.txt"):
        lines = [line.split(" ", 1)[0] + " ZZZ QQQ GARBAGE\n" for line in trans.read_text().splitlines()]
        trans.write_text("".join(lines))
    proc, out = run(["./run.sh", "--stage", "1", "--stop_stage", "7", "--seed_exp", str(seed_exp),
                     "--corpus_dir", str(garbage), "--data", str(tmp_path / "data2"), "--exp", str(tmp_path / "exp2"),
                     "--tag", "smoke", *ADAPT, "--wiseft_alphas", ""])  # one sentence read throughout: no dev part to choose on
    assert proc.returncode == 0, out[-4000:]
    assert "GARBAGE" in (tmp_path / "data2/sessions/test-other/truth/adapt_text").read_text()
    hyps = [e / "seed/decode_asr_ctc_fusion_lm/labels_test-other/hyps.jsonl" for e in (exp, tmp_path / "exp2")]
    texts = [[(r["utt_id"], r["text"]) for r in map(json.loads, h.read_text().splitlines())] for h in hyps]
    assert texts[0] == texts[1]
    models = [torch.load(e / "smoke/gen1/fl/latest.pth", map_location="cpu") for e in (exp, tmp_path / "exp2")]
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    seed = torch.load(exp / "seed/model.pth", map_location="cpu")
    assert any(not torch.equal(seed[k], models[0][k]) for k in seed)  # adaptation did change the model
