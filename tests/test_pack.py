"""Stage 7: the packed model decodes with stock `Speech2Text.from_pretrained` as stage 6 decodes."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONF, UTTS, flite_cuts

REPO = Path(__file__).resolve().parents[1]


def _equal_length(cuts: Path) -> Path:
    """The cuts' WAVs padded to one length: in a padded batch ESPnet's STFT and conv2d
    subsampling see the last frames of the shorter cuts otherwise than alone (conv2d even
    counts one more frame), and a model this overfitted relies on them. The padding is faint
    noise: digital silence has log-energy -inf-ish frames that swamp global_mvn's statistics."""
    import numpy as np
    import soundfile
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSet, load_manifest

    cut_list = list(load_manifest(cuts))
    n = max(c.recording.num_samples for c in cut_list)
    recs = []
    for cut in cut_list:
        wav = cut.recording.sources[0].source
        audio, rate = soundfile.read(wav, dtype="int16")
        noise = np.random.default_rng(0).integers(-8, 9, n - len(audio)).astype(np.int16)
        soundfile.write(wav, np.concatenate([audio, noise]), rate)
        recs.append(Recording.from_file(wav, recording_id=cut.recording.id))
    sups = SupervisionSet.from_segments([s for c in cut_list for s in c.supervisions])
    CutSet.from_manifests(recordings=RecordingSet.from_recordings(recs), supervisions=sups).to_file(cuts)
    return cuts


def _recipe_exp(root: Path, cuts: Path) -> None:
    """In `root`, as run.sh lays it out and with its relative paths: a char sentencepiece model
    (stage 4), federated feature statistics (stage 3), and a small CTC-only model built as
    fl_train builds it (global_mvn, token_type bpe), overfitted on the four cuts; and an
    untrained ESPnet LM on the same tokens, saved as ESPnet's LM trainer saves one."""
    import torch
    from espnet2.tasks.lm import LMTask
    from espnet2.utils.yaml_no_alias_safe_dump import yaml_no_alias_safe_dump
    from lhotse import load_manifest

    from fl_lib.asr.model import build_asr_args, build_asr_model, save_espnet_config
    from fl_lib.data.clients import split_clients
    from fl_lib.data.tokenizer import Tokenizer, train_tokenizer
    from fl_lib.features.stats import federated_feats_stats

    conf = yaml.safe_load((CONF / "train_asr_rnn_small.yaml").read_text())
    conf["frontend_conf"]["n_mels"] = 40
    # A small transformer: 4x faster per step than the recipe's GRU.
    conf["encoder"], conf["encoder_conf"] = "transformer", {
        "output_size": 64, "attention_heads": 2, "linear_units": 128, "num_blocks": 2, "input_layer": "conv2d",
        "dropout_rate": 0.0}
    conf["decoder"], conf["model_conf"] = None, {"ctc_weight": 1.0}  # CTC only, as the recipe's model
    del conf["decoder_conf"]
    (root / "conf").mkdir(parents=True)
    (root / "conf/asr.yaml").write_text(yaml.safe_dump(conf))
    texts = [t for _, sentences in UTTS.values() for t in sentences]
    bpemodel, tokens = train_tokenizer(texts, Path("data/token_list/char"), "char")
    clients = split_clients(cuts, Path("data/clients"), min_utts=1)
    stats = federated_feats_stats(clients, Path("conf/asr.yaml"), Path("exp/asr_stats"))
    args = build_asr_args(Path("conf/asr.yaml"), tokens, bpemodel, stats)
    torch.manual_seed(0)
    model = build_asr_model(args)
    tok = Tokenizer(bpemodel, tokens)
    cut_list = list(load_manifest(cuts))
    # The cuts are equally long (`_equal_length`): the batch has no padding, so the model sees
    # each cut as Speech2Text sees it alone.
    wavs = [torch.from_numpy(c.load_audio()[0]) for c in cut_list]
    ids = [tok.encode(c.supervisions[0].text) for c in cut_list]
    batch = {
        "speech": torch.stack(wavs),
        "speech_lengths": torch.tensor([len(w) for w in wavs]),
        "text": torch.nn.utils.rnn.pad_sequence([torch.tensor(i) for i in ids], batch_first=True, padding_value=-1),
        "text_lengths": torch.tensor([len(i) for i in ids]),
    }
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(240):  # all four read right from ~200 steps on
        loss = model(**batch)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        enc, enc_lens = model.encode(batch["speech"], batch["speech_lengths"])
        best = model.ctc.argmax(enc)
    for cut, path, n in zip(cut_list, best, enc_lens):
        assert tok.decode(torch.unique_consecutive(path[:n]).tolist()) == cut.supervisions[0].text, "did not fit"
    save_espnet_config(args, Path("exp/tiny/config.yaml"))
    torch.save(model.state_dict(), "exp/tiny/valid.acc.best.pth")

    lm_args = LMTask.get_parser().parse_args([])
    lm_args.lm, lm_args.lm_conf = "seq_rnn", {"unit": 16, "nlayers": 1}
    lm_args.token_list = tok.tokens
    lm_args.token_type, lm_args.bpemodel = "bpe", str(bpemodel)
    lm = LMTask.build_model(lm_args)
    Path("exp/lm").mkdir(parents=True)
    with open("exp/lm/config.yaml", "w") as f:
        yaml_no_alias_safe_dump(vars(lm_args), f, indent=4, sort_keys=False)
    torch.save(lm.state_dict(), "exp/lm/1epoch.pth")
    Path("exp/lm/valid.loss.best.pth").symlink_to("1epoch.pth")  # as ESPnet's trainer links its best model


def test_packed_model_decodes_with_from_pretrained_as_stage_6(tmp_path, monkeypatch):
    import soundfile
    import torch
    from espnet2.bin.asr_inference import Speech2Text
    from lhotse import load_manifest

    from fl_lib.asr.decode import decode_cuts
    from fl_lib.asr.pack import pack_model
    from fl_lib.asr.scoring import normalize

    cuts = _equal_length(flite_cuts(tmp_path, UTTS, "cuts.jsonl.gz"))
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    monkeypatch.chdir(recipe)
    _recipe_exp(recipe, cuts)
    # The recipe's decoding (CTC prefix beam search, the LM in shallow fusion), at a weight an
    # untrained LM cannot drown the overfitted CTC with.
    decode = {**yaml.safe_load((CONF / "decode_asr_ctc_fusion.yaml").read_text()), "lm_weight": 0.2}
    Path("conf/decode.yaml").write_text(yaml.safe_dump(decode))
    lm = {"lm_train_config": Path("exp/lm/config.yaml"), "lm_file": Path("exp/lm/valid.loss.best.pth")}

    # Stage 6, then stage 7 (the API that fl_lib.bin.pack_model calls).
    decode_cuts(Path("exp/tiny"), "best", Path("conf/decode.yaml"), cuts, Path("exp/tiny/decode/test"), nj=1, **lm)
    stage6 = dict(line.split(" ", 1) for line in Path("exp/tiny/decode/test/text").read_text().splitlines())
    (recipe / "exp/tiny/RESULTS.md").write_text("# results\n")
    pack_model(Path("exp/tiny"), "best", Path("conf/decode.yaml"), Path("exp/tiny/tiny_best.zip"), **lm)
    packed = shutil.move(recipe / "exp/tiny/tiny_best.zip", tmp_path / "tiny_best.zip")
    shutil.rmtree(recipe)  # nothing of the experiment is left but the zip
    monkeypatch.chdir(tmp_path)

    # The README's lines, read from the README, on the packed zip and the first utterance.
    readme = (REPO / "README.md").read_text().split("**Decoding a WAV.**", 1)[1]
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    first = load_manifest(cuts)[0].recording.sources[0].source
    assert '"exp/<tag>/<tag>_valid.acc.best.zip"' in code and '"utt.wav"' in code
    torch.set_num_threads(1)  # as the stage-6 worker: the same float sums
    readme_run: dict = {}
    exec(code.replace('"exp/<tag>/<tag>_valid.acc.best.zip"', repr(str(packed))).replace('"utt.wav"', repr(first)), readme_run)
    files, s2t = readme_run["files"], readme_run["s2t"]
    assert isinstance(s2t, Speech2Text) and normalize(readme_run["text"]) == stage6[load_manifest(cuts)[0].id]
    assert set(files) == {"asr_train_config", "asr_model_file", "lm_train_config", "lm_file"}
    assert yaml.safe_load(open("model/decode.yaml")) == decode
    asr_conf = yaml.safe_load(open(files["asr_train_config"]))
    assert asr_conf["bpemodel"] == "model/data/token_list/bpe.model"
    assert asr_conf["normalize_conf"]["stats_file"] == "model/exp/asr_stats/feats_stats.npz"
    assert yaml.safe_load(open(files["lm_train_config"]))["bpemodel"] == "model/data/token_list/bpe.model"
    assert Path("model/data/token_list/tokens.txt").read_text().split() == asr_conf["token_list"]
    assert Path("model/exp/asr/RESULTS.md").is_file()
    assert s2t.asr_model.decoder is None and type(s2t.tokenizer).__name__ == "SentencepiecesTokenizer"
    assert s2t.beam_search.weights["lm"] == 0.2 and s2t.beam_search.weights["ctc"] == 1.0

    for cut in load_manifest(cuts):
        speech, rate = soundfile.read(cut.recording.sources[0].source)
        assert rate == 16000
        text = s2t(speech)[0][0]
        assert normalize(text) == stage6[cut.id] == cut.supervisions[0].text, (cut.id, text, stage6)


def test_pack_refuses_what_it_cannot_carry(tmp_path):
    """An n-gram (the packer has no slot for it) and an LM of other tokens are errors, not a broken zip."""
    from fl_lib.asr.pack import pack_model

    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.yaml").write_text(yaml.safe_dump({"token_list": ["<blank>", "<unk>", "A", "<sos/eos>"]}))
    torch.save({"w": torch.zeros(1)}, exp / "valid.acc.best.pth")  # stage 6 checks it loads, weights-only
    ngram = tmp_path / "ngram.yaml"
    ngram.write_text("beam_size: 4\nctc_weight: 1.0\nlm_weight: 0.0\nngram_file: x.bin\nngram_weight: 0.5\n")
    with pytest.raises(ValueError, match="n-gram"):
        pack_model(exp, "best", ngram, tmp_path / "a.zip")
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm/tokens.txt").write_text("<blank>\n<unk>\nB\n<sos/eos>\n")
    (tmp_path / "lm/config.yaml").write_text(f"token_list: {tmp_path / 'lm/tokens.txt'}\n")
    (tmp_path / "lm/lm.pth").write_text("x")
    fused = tmp_path / "fused.yaml"
    fused.write_text("beam_size: 4\nctc_weight: 1.0\nlm_weight: 1.0\n")
    with pytest.raises(ValueError, match="the LM must use the ASR model's tokens"):
        pack_model(exp, "best", fused, tmp_path / "b.zip", tmp_path / "lm/config.yaml", tmp_path / "lm/lm.pth")
    assert not list(tmp_path.glob("*.zip")) and not list(tmp_path.glob(".pack.*"))


def test_pack_model_help_imports_neither_torch_nor_espnet():
    """--help must not import ESPnet or torch."""
    code = "import sys, runpy; sys.argv=['x','--help']\ntry: runpy.run_module('fl_lib.bin.pack_model', run_name='__main__')\n" \
           "except SystemExit: pass\nassert 'torch' not in sys.modules and 'espnet2' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)
