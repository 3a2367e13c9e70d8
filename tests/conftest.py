"""Session-wide fixtures: one tiny embedded corpus, carried through stages 0-4.

Each fixture calls the same library function the recipe's stage calls, on real
synthesized audio, so the later tests (training, decoding) run on real data.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import fl_lib  # noqa: F401  sets MKL_CBWR before any test module loads torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
CONF = Path(__file__).resolve().parents[1] / "egs/librispeech_fl/conf"
# Files that run whole recipes or several processes, longest first. `make test` hands whole
# files to its pytest-xdist workers in collection order (--dist loadfile
# --no-loadscope-reorder); started last, one of them would run alone on one core at the end.
SLOW_FILES = ("test_recipe.py", "test_recipe_session_adapt.py", "test_flower.py", "test_distributed.py", "test_fl_train.py",
              "test_faults.py", "test_decode.py", "test_pack.py")


def pytest_collection_modifyitems(items):
    """Slow files first, each file's tests in their own order."""
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Stage 0: a LibriSpeech-layout root with train-clean-100, dev-clean, test-clean, test-other."""
    from fl_lib.corpus.synthesize import CorpusConfig, synthesize_corpus

    root = tmp_path_factory.mktemp("corpus") / "LibriSpeech"
    synthesize_corpus(root, CorpusConfig.tiny(seed=0), nj=2)
    return root


@pytest.fixture(scope="session")
def tiny_manifests(tiny_corpus, tmp_path_factory) -> dict:
    """Stage 1: {part: cuts manifest path}."""
    from fl_lib.data.manifests import prepare_manifests

    return prepare_manifests(tiny_corpus, tmp_path_factory.mktemp("manifests"), nj=2)


@pytest.fixture(scope="session")
def tiny_clients(tiny_manifests, tmp_path_factory) -> Path:
    """Stage 2: clients.jsonl of the training part, one client per speaker."""
    from fl_lib.data.clients import split_clients

    out = tmp_path_factory.mktemp("clients")
    return split_clients(tiny_manifests["train-clean-100"], out, min_utts=1)


@pytest.fixture(scope="session")
def tiny_sets(tiny_manifests, tmp_path_factory) -> dict:
    """Stage 2: {part: filtered cuts} of the dev and test parts."""
    from fl_lib.data.clients import filter_cuts

    out = tmp_path_factory.mktemp("sets")
    return {
        part: filter_cuts(tiny_manifests[part], out / f"{part}.jsonl.gz")
        for part in ("dev-clean", "test-clean", "test-other")
    }


@pytest.fixture(scope="session")
def tiny_tokens(tiny_clients, tmp_path_factory):
    """Stage 4: (bpemodel, token_list) of a char sentencepiece model."""
    from fl_lib.data.tokenizer import train_tokenizer_from_clients

    out = tmp_path_factory.mktemp("tokens")
    return train_tokenizer_from_clients(tiny_clients, out, token_type="char", vocab_size=0)


@pytest.fixture(scope="session")
def tiny_asr_config() -> Path:
    """The small ESPnet model config that the recipe ships."""
    return Path(__file__).resolve().parents[1] / "egs/librispeech_fl/conf/train_asr_rnn_small.yaml"


@pytest.fixture(scope="session")
def tiny_stats(tiny_clients, tiny_asr_config, tmp_path_factory) -> Path:
    """Stage 3: feats_stats.npz summed from per-client statistics."""
    from fl_lib.features.stats import federated_feats_stats

    out = tmp_path_factory.mktemp("stats")
    return federated_feats_stats(tiny_clients, tiny_asr_config, out)


@pytest.fixture(scope="session")
def fl_data(tiny_clients, tiny_sets, tiny_tokens, tiny_stats, tiny_asr_config) -> dict:
    """`fl_train`'s data arguments on the tiny corpus (stages 0-4)."""
    bpemodel, token_list = tiny_tokens
    return dict(asr_config=tiny_asr_config, train_clients=tiny_clients, dev_cuts=tiny_sets["dev-clean"],
                token_list=token_list, bpemodel=bpemodel, feats_stats=tiny_stats)


# A real ESPnet model overfitted on four flite utterances: decoding and pseudo-labelling tests share it.
UTTS = {  # speaker: (voice, sentences)
    "slt": ("slt", ["TURN ON THE LIGHTS", "OPEN THE DOOR"]),
    "rms": ("rms", ["TURN OFF THE RADIO", "CLOSE THE DOOR"]),
}


def flite_cuts(tmp: Path, utts: dict, name: str) -> Path:
    """A Lhotse CutSet manifest of flite utterances, `utts` = {speaker: (voice, sentences)}."""
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    recs, sups = [], []
    for spk, (voice, sentences) in utts.items():
        for i, text in enumerate(sentences):
            utt = f"{spk}-0-{i:04d}"
            wav = tmp / f"{utt}.wav"
            subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(wav)], check=True)
            rec = Recording.from_file(wav, recording_id=utt)
            recs.append(rec)
            sups.append(SupervisionSegment(id=utt, recording_id=utt, start=0.0, duration=rec.duration,
                                           text=text, speaker=spk))
    path = tmp / name
    CutSet.from_manifests(recordings=RecordingSet.from_recordings(recs),
                          supervisions=SupervisionSet.from_segments(sups)).to_file(path)
    return path


def _cuts(tmp: Path) -> Path:
    """Four flite utterances from two voices as a Lhotse CutSet manifest."""
    return flite_cuts(tmp, UTTS, "cuts.jsonl.gz")


def _tiny_exp(exp: Path, cuts_path: Path) -> None:
    """A shrunken copy of the recipe's small model, overfitted a few steps, saved as the trainer does."""
    from lhotse import load_manifest

    import torch

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


@pytest.fixture(scope="session")
def tiny_exp(tmp_path_factory) -> tuple[Path, Path]:
    """(exp_dir, cuts manifest) with a real ESPnet model that has learned a little."""
    assert shutil.which("flite"), "flite is missing: run `make install`"
    tmp = tmp_path_factory.mktemp("decode")
    cuts = _cuts(tmp)
    _tiny_exp(tmp / "exp", cuts)
    return tmp / "exp", cuts


def bench_module(name: str):
    """A bench/ script loaded as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, CONF.parents[2] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tiny_lm_config(tmp_path: Path) -> Path:
    """The recipe's LM config, shrunk for tests."""
    conf = yaml.safe_load((CONF / "train_lm_rnn.yaml").read_text())
    conf["lm_conf"]["unit"] = 32
    conf.update(max_epoch=2, batch_size=16)
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def train_lm_cli(*args) -> subprocess.CompletedProcess:
    """`python -m fl_lib.bin.train_lm ARGS`, as run.sh stage 4 calls it."""
    return subprocess.run([sys.executable, "-m", "fl_lib.bin.train_lm", *map(str, args)],
                          cwd=CONF.parents[2], capture_output=True, text=True)
