"""Decoding with a real (tiny) ESPnet model: parallel workers must not change the output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_lm_config, train_lm_cli

from fl_lib.asr.average import average_state_dicts, resolve_model, round_checkpoints
from fl_lib.asr.decode import decode_cuts, load_inference_config

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "egs/librispeech_fl/conf"


def test_nj2_equals_nj1(tiny_exp, tmp_path):
    """API with nj=1 and the run.sh stage-6 command line with nj=2 give the same hypotheses."""
    exp, cuts = tiny_exp
    # The recipe's beam search, scored by the CTC head alone: the fixture verified
    # that CTC reads every utterance, so its beams have margins. The tiny attention
    # decoder does not (OF / OFF were measured to flip with last-bit float
    # differences between worker processes), and this test is about nj, not floats.
    conf = tmp_path / "decode_ctc.yaml"
    conf.write_text(yaml.safe_dump({**yaml.safe_load((CONF / "decode_asr.yaml").read_text()), "ctc_weight": 1.0}))
    model = "valid.acc.ave_2best.pth"  # averaged from the kept round checkpoints, written into exp
    one = decode_cuts(exp, model, conf, cuts, tmp_path / "nj1" / "test", nj=1)
    subprocess.run(
        [sys.executable, "-m", "fl_lib.bin.decode", "--exp_dir", str(exp), "--model", model,
         "--inference_config", str(conf), "--cuts", str(cuts), "--nj", "2",
         "--output_dir", str(tmp_path / "nj2" / "test")],
        check=True, cwd=REPO,
    )
    assert (exp / model).is_file()
    two = json.loads((tmp_path / "nj2/test/score.json").read_text())
    assert (tmp_path / "nj1/test/text").read_text() == (tmp_path / "nj2/test/text").read_text()
    assert one["wer"] == two["wer"] and one["cer"] == two["cer"] and two["model"] == model

    out = tmp_path / "nj1" / "test"
    ids = [line.split(maxsplit=1)[0] for line in (out / "text").read_text().splitlines()]
    from lhotse import load_manifest

    assert ids == [c.id for c in load_manifest(cuts)]  # merged in cut order
    ref = (out / "ref.trn").read_text().splitlines()
    assert ref[0] == f"TURN ON THE LIGHTS\t(slt-{ids[0]})"
    assert len((out / "hyp.trn").read_text().splitlines()) == 4
    score = json.loads((out / "score.json").read_text())
    assert score["num_utts"] == 4 and set(score["per_speaker_wer"]) == {"slt", "rms"}
    assert score["wer"]["counts"]["Wrd"] == 14
    assert score["wer"]["counts"]["Corr"] == 14, "the overfitted model must read all four utterances"
    assert "|dataset|Snt|Wrd|Corr|Sub|Del|Ins|Err|S.Err|" in (out / "result.txt").read_text()


@pytest.fixture(scope="module")
def door_lm(tiny_exp, tmp_path_factory) -> Path:
    """fl_lib.bin.train_lm's ESPnet LM of a text that is only OPEN THE DOOR (its exp dir)."""
    exp, _ = tiny_exp
    tmp = tmp_path_factory.mktemp("door_lm")
    tokens = tmp / "tokens.txt"
    tokens.write_text("\n".join(yaml.safe_load((exp / "config.yaml").read_text())["token_list"]) + "\n")
    text = tmp / "lm.txt"
    text.write_text("OPEN THE DOOR\n" * 200)
    lm = tmp / "lm"
    args = ["--lm_config", tiny_lm_config(tmp), "--text", text, "--token_list", tokens, "--output_dir", lm]
    proc = train_lm_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (lm / "valid.loss.best.pth").is_file() and (lm / "config.yaml").is_file()
    again = train_lm_cli(*args)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    return lm


def test_an_lm_steers_decoding(tiny_exp, door_lm, tmp_path):
    """fl_lib.bin.train_lm trains an ESPnet LM that decoding then uses. The tiny model reads
    all four cuts right without an LM (the fixture checks it); an LM that only knows
    OPEN THE DOOR, at weight 10, must pull the hypotheses away from words it never saw."""
    exp, cuts = tiny_exp
    lm = door_lm
    conf = tmp_path / "fused.yaml"
    conf.write_text(yaml.safe_dump({"beam_size": 4, "ctc_weight": 1.0, "lm_weight": 10.0, "nbest": 1}))
    score = decode_cuts(exp, "valid.acc.best.pth", conf, cuts, tmp_path / "fused",
                        lm_train_config=lm / "config.yaml", lm_file=lm / "valid.loss.best.pth")
    assert score["inference_config"]["lm_file"] == str(lm / "valid.loss.best.pth")
    hyps = [line.split(" ", 1)[1] for line in (tmp_path / "fused/text").read_text().splitlines()]
    # Without the LM two of the four read TURN ON THE LIGHTS / TURN OFF THE RADIO; the LM never saw those words.
    assert len(hyps) == 4 and not {"TURN", "LIGHTS", "RADIO"} & set(" ".join(hyps).split()), hyps


def test_tune_decoding_chooses_the_checkpoint_and_lm_weight_of_fewest_dev_errors(tiny_exp, door_lm, tmp_path):
    """Two checkpoints (the trained one, and one whose CTC output layer is scrambled) times two LM
    weights of the OPEN THE DOOR LM (10, which pulls every hypothesis off, then 0.01): the trained
    model at 0.01, the last of the four, is the only trial that reads all four cuts right."""
    exp, cuts = tiny_exp
    state = torch.load(exp / "valid.acc.best.pth", map_location="cpu")
    gen = torch.Generator().manual_seed(0)
    scrambled = {k: torch.randn(v.shape, generator=gen) if k.startswith("ctc.") and v.is_floating_point() else v
                 for k, v in state.items()}
    torch.save(scrambled, exp / "scrambled.pth")  # only named explicitly: not a round file, so `kept` never sees it
    conf = tmp_path / "fused.yaml"
    conf.write_text(yaml.safe_dump({"beam_size": 4, "ctc_weight": 1.0, "lm_weight": 3.0, "nbest": 1}))
    lm_args = ["--lm_train_config", str(door_lm / "config.yaml"), "--lm_file", str(door_lm / "valid.loss.best.pth")]
    out = tmp_path / "tune"
    cmd = [sys.executable, "-m", "fl_lib.bin.tune_decoding", "--exp_dir", str(exp), "--models", "scrambled.pth",
           "valid.acc.best.pth", "--inference_config", str(conf), "--lm_weights", "10", "0.01", "--cuts", str(cuts),
           "--nj", "1", "--output_dir", str(out), *lm_args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [(t["model"], t["lm_weight"]) for t in trials] == [
        ("scrambled.pth", 10.0), ("scrambled.pth", 0.01), ("valid.acc.best.pth", 10.0), ("valid.acc.best.pth", 0.01)]
    assert trials[3]["errors"] == 0 and min(t["errors"] for t in trials[:3]) > 0, trials
    choice = json.loads((out / "choice.json").read_text())
    assert (choice["model"], choice["lm_weight"], choice["errors"], choice["candidates"]) == ("valid.acc.best.pth", 0.01, 0, 4)
    assert yaml.safe_load((out / "decode.yaml").read_text()) == {**yaml.safe_load(conf.read_text()), "lm_weight": 0.01}
    assert (out / "model.pth").read_bytes() == (exp / "valid.acc.best.pth").read_bytes()
    assert "**0.00**" in (out / "TUNE.md").read_text()
    # Again: every trial is reused, and the unchanged choice leaves its files as they were.
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("decode.yaml", "model.pth")}
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and again.stderr.count("decoded already, reused") == 4, again.stderr[-3000:]
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps
    # A checkpoint of another experiment is not a candidate; weights without an LM have nothing to weigh.
    outside = tmp_path / "elsewhere.pth"
    outside.write_bytes((exp / "valid.acc.best.pth").read_bytes())
    bad = subprocess.run([*cmd[: cmd.index("--models") + 1], str(outside), *cmd[cmd.index("--inference_config"):]],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "is not a checkpoint of" in bad.stderr
    # A dev set without words chooses nothing, rather than the first candidate by default.
    from lhotse import CutSet

    from fl_lib.asr.tune_decoding import tune_decoding

    empty = tmp_path / "empty.jsonl.gz"
    CutSet.from_cuts([]).to_file(empty)
    with pytest.raises(ValueError, match="has no words to score"):
        tune_decoding(exp, ["valid.acc.best.pth"], conf, empty, tmp_path / "tune_empty",
                      lm_train_config=door_lm / "config.yaml", lm_file=door_lm / "valid.loss.best.pth")
    bad = subprocess.run(cmd[: cmd.index("--lm_train_config")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "lm_weights are tried with an LM" in bad.stderr


def test_average_is_mean(tmp_path):
    states = [
        {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5], dtype=torch.float16), "n": torch.tensor(3)},
        {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([1.5], dtype=torch.float16), "n": torch.tensor(5)},
        {"w": torch.tensor([5.0, 1.0]), "b": torch.tensor([1.0], dtype=torch.float16), "n": torch.tensor(7)},
    ]
    paths = []
    for i, state in enumerate(states, 1):
        paths.append(tmp_path / f"{i}round.pth")
        torch.save(state, paths[-1])
    avg = average_state_dicts(paths)
    assert torch.equal(avg["w"], torch.tensor([3.0, 3.0]))
    assert avg["b"].dtype == torch.float16 and torch.equal(avg["b"], torch.tensor([1.0], dtype=torch.float16))
    assert avg["n"].item() == 7  # integer counters come from the last checkpoint


def test_resolve_model_ranks_by_dev_acc(tmp_path):
    for r, value in ((1, 0.0), (2, 10.0), (3, 20.0)):
        torch.save({"w": torch.tensor([value])}, tmp_path / f"{r}round.pth")
    rows = [{"round": 1, "dev_acc": 0.5}, {"round": 2, "dev_acc": 0.2}, {"round": 3, "dev_acc": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(round_checkpoints(tmp_path)) == [1, 2, 3]
    path = resolve_model(tmp_path, "valid.acc.ave_2best.pth")
    assert path == tmp_path / "valid.acc.ave_2best.pth"
    assert torch.load(path)["w"].item() == 10.0  # rounds 1 and 3
    assert torch.load(resolve_model(tmp_path, "valid.acc.ave"))["w"].item() == 10.0  # all kept rounds
    assert torch.load(resolve_model(tmp_path, "valid.acc.ave_1best.pth"))["w"].item() == 0.0
    assert resolve_model(tmp_path, "ave") == tmp_path / "valid.acc.ave.pth"
    (tmp_path / "latest.pth").write_bytes((tmp_path / "3round.pth").read_bytes())
    assert resolve_model(tmp_path, "latest") == tmp_path / "latest.pth"
    assert resolve_model(tmp_path, "2round.pth") == tmp_path / "2round.pth"
    with pytest.raises(FileNotFoundError, match="available"):
        resolve_model(tmp_path, "missing.pth")


def test_centralized_epoch_checkpoints_average_like_rounds(tmp_path):
    """The centralized reference keeps <N>epoch.pth and logs `epoch`: valid.acc.ave ranks and averages them too."""
    for e, value in ((5, 0.0), (6, 10.0), (7, 20.0)):
        torch.save({"w": torch.tensor([value])}, tmp_path / f"{e}epoch.pth")
    rows = [{"epoch": 5, "dev_acc": None, "dev_loss": 3.0}, {"epoch": 6, "dev_acc": None, "dev_loss": 1.0},
            {"epoch": 7, "dev_acc": None, "dev_loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert torch.load(resolve_model(tmp_path, "valid.acc.ave_2best.pth"))["w"].item() == 15.0  # epochs 6 and 7
    assert torch.load(resolve_model(tmp_path, "valid.acc.ave"))["w"].item() == 10.0


def test_ctc_only_rounds_rank_by_dev_loss_as_the_best_model_does(tmp_path):
    """A CTC-only model reports no accuracy: averaging ranks by −dev_loss, the criterion that
    picks valid.acc.best.pth, not by recency."""
    for r, value in ((1, 0.0), (2, 10.0), (3, 20.0)):
        torch.save({"w": torch.tensor([value])}, tmp_path / f"{r}round.pth")
    rows = [{"round": 1, "dev_loss": 30.0, "dev_acc": None}, {"round": 2, "dev_loss": 10.0, "dev_acc": None},
            {"round": 3, "dev_loss": 20.0, "dev_acc": None}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert torch.load(resolve_model(tmp_path, "valid.acc.ave_2best.pth"))["w"].item() == 15.0  # rounds 2 and 3
    assert torch.load(resolve_model(tmp_path, "valid.acc.ave_1best.pth"))["w"].item() == 10.0


def test_rounds_rank_by_the_dev_score_the_run_recorded(tmp_path):
    """A run with best_criterion: wer records dev_score = −dev WER: averaging ranks by it, not by
    the dev loss that the rows also carry."""
    for r, value in ((1, 0.0), (2, 10.0), (3, 20.0)):
        torch.save({"w": torch.tensor([value])}, tmp_path / f"{r}round.pth")
    rows = [{"round": 1, "dev_loss": 10.0, "dev_acc": None, "dev_wer": 0.2, "dev_score": -0.2},
            {"round": 2, "dev_loss": 20.0, "dev_acc": None, "dev_wer": 0.5, "dev_score": -0.5},
            {"round": 3, "dev_loss": 30.0, "dev_acc": None, "dev_wer": 0.1, "dev_score": -0.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert torch.load(resolve_model(tmp_path, "valid.acc.ave_2best.pth"))["w"].item() == 10.0  # rounds 1 and 3


def test_criterion_score():
    from fl_lib.asr.average import criterion_score

    assert criterion_score("acc", 2.0, 0.7, 0.3) == 0.7
    assert criterion_score("acc", 2.0, None, 0.3) == -2.0  # CTC-only: no accuracy, as ESPnet's valid.acc falls back
    assert criterion_score("loss", 2.0, 0.7, 0.3) == -2.0
    assert criterion_score("wer", 2.0, 0.7, 0.3) == -0.3
    assert criterion_score("wer", None, None, None) is None  # a round that was not validated
    with pytest.raises(ValueError, match="without a CTC head"):
        criterion_score("wer", 2.0, 0.7, None)


def test_inference_config(tmp_path):
    conf = load_inference_config(CONF / "decode_asr.yaml")
    assert 4 <= conf["beam_size"] <= 10 and 0.3 <= conf["ctc_weight"] <= 0.5 and conf["nbest"] == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("beam_size: 4\nbeam: 3\n")
    with pytest.raises(ValueError, match="beam"):
        load_inference_config(bad)


def test_decode_help_imports_neither_torch_nor_espnet():
    """--help must not import ESPnet or torch."""
    code = "import sys, runpy; sys.argv=['x','--help']\ntry: runpy.run_module('fl_lib.bin.decode', run_name='__main__')\n" \
           "except SystemExit: pass\nassert 'torch' not in sys.modules and 'espnet2' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)
