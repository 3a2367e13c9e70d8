"""Decoding with a real (tiny) ESPnet model: parallel workers must not change the output."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fl_lib.asr.average import average_state_dicts, resolve_model, round_checkpoints
from fl_lib.asr.decode import decode_cuts, load_inference_config

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "egs/librispeech_fl/conf"
UTTS = {  # speaker: (voice, sentences)
    "slt": ("slt", ["TURN ON THE LIGHTS", "OPEN THE DOOR"]),
    "rms": ("rms", ["TURN OFF THE RADIO", "CLOSE THE DOOR"]),
}


def _cuts(tmp: Path) -> Path:
    """Four flite utterances from two voices as a Lhotse CutSet manifest."""
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    recs, sups = [], []
    for spk, (voice, sentences) in UTTS.items():
        for i, text in enumerate(sentences):
            utt = f"{spk}-0-{i:04d}"
            wav = tmp / f"{utt}.wav"
            subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(wav)], check=True)
            rec = Recording.from_file(wav, recording_id=utt)
            recs.append(rec)
            sups.append(SupervisionSegment(id=utt, recording_id=utt, start=0.0, duration=rec.duration,
                                           text=text, speaker=spk))
    path = tmp / "cuts.jsonl.gz"
    CutSet.from_manifests(recordings=RecordingSet.from_recordings(recs),
                          supervisions=SupervisionSet.from_segments(sups)).to_file(path)
    return path


def _tiny_exp(exp: Path, cuts_path: Path) -> None:
    """A shrunken copy of the recipe's small model, overfitted a few steps, saved as the trainer does."""
    from lhotse import load_manifest

    from fl_lib.espnet_env import asr_task

    task = asr_task()
    args = task.get_parser().parse_args([])
    conf = yaml.safe_load((CONF / "train_asr_rnn_small.yaml").read_text())
    conf["normalize"] = None
    conf["encoder_conf"].update(num_layers=2, hidden_size=48, output_size=48, subsample=[2, 2])
    conf["decoder"], conf["decoder_conf"] = "transformer", {"attention_heads": 2, "linear_units": 96, "num_blocks": 1}
    conf["frontend_conf"]["n_mels"] = 40
    vars(args).update(conf)
    chars = sorted({c for _, s in UTTS.values() for t in s for c in t if c != " "})
    args.token_list = ["<blank>", "<unk>", "<space>", *chars, "<sos/eos>"]
    args.token_type, args.bpemodel = "char", None
    torch.manual_seed(0)
    model = task.build_model(args)

    cuts = list(load_manifest(cuts_path))
    cuts.sort(key=lambda c: -c.duration)  # ESPnet's RNN encoder wants longest first
    wavs = [torch.from_numpy(c.load_audio()[0]) for c in cuts]
    ids = [[args.token_list.index("<space>" if ch == " " else ch) for ch in c.supervisions[0].text] for c in cuts]
    batch = {
        "speech": torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True),
        "speech_lengths": torch.tensor([len(w) for w in wavs]),
        "text": torch.nn.utils.rnn.pad_sequence([torch.tensor(i) for i in ids], batch_first=True, padding_value=-1),
        "text_lengths": torch.tensor([len(i) for i in ids]),
    }
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "config.yaml").write_text(yaml.safe_dump(vars(args)))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 OpenMP threads on 2 busy cores run ~10x slower
    # Overfitted until CTC alone reads all four utterances: a barely trained
    # model's beams are near-ties that last-bit float differences between
    # processes can flip, and then nj=1 and nj=2 would disagree.
    for step in range(1, 241):
        loss = model(**batch)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 80 == 0:
            torch.save(model.state_dict(), exp / f"{step // 80}round.pth")
    model.eval()
    with torch.no_grad():
        enc, enc_lens = model.encode(batch["speech"], batch["speech_lengths"])
        best = model.ctc.argmax(enc)
    for cut, path, n in zip(cuts, best, enc_lens):
        tokens = [args.token_list[i] for i in torch.unique_consecutive(path[:n]).tolist() if i]
        assert "".join(tokens).replace("<space>", " ") == cut.supervisions[0].text, "tiny model did not fit"
    torch.set_num_threads(threads)
    shutil.copy(exp / "3round.pth", exp / "valid.acc.best.pth")


@pytest.fixture(scope="module")
def tiny_exp(tmp_path_factory) -> tuple[Path, Path]:
    """(exp_dir, cuts manifest) with a real ESPnet model that has learned a little."""
    assert shutil.which("flite"), "flite is missing: run `make install`"
    tmp = tmp_path_factory.mktemp("decode")
    cuts = _cuts(tmp)
    _tiny_exp(tmp / "exp", cuts)
    return tmp / "exp", cuts


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


def test_inference_config(tmp_path):
    conf = load_inference_config(CONF / "decode_asr.yaml")
    assert 4 <= conf["beam_size"] <= 10 and 0.3 <= conf["ctc_weight"] <= 0.5 and conf["nbest"] == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("beam_size: 4\nbeam: 3\n")
    with pytest.raises(ValueError, match="beam"):
        load_inference_config(bad)


def test_decode_help_is_fast():
    """--help must not import ESPnet or torch."""
    code = "import sys, runpy; sys.argv=['x','--help']\ntry: runpy.run_module('fl_lib.bin.decode', run_name='__main__')\n" \
           "except SystemExit: pass\nassert 'torch' not in sys.modules and 'espnet2' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)
