"""Stage 1: manifests of a clean corpus, checked with lhotse's own CLI."""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lhotse import load_manifest_lazy

from fl_lib.data.manifests import manifest_path, prepare_manifests

LHOTSE = str(Path(sys.executable).with_name("lhotse"))
SENTENCES = ["TURN ON THE LIGHT", "OPEN THE DOOR", "PLAY SOME MUSIC"]


@pytest.fixture(scope="module")
def flite_corpus(tmp_path_factory) -> Path:
    """Real TTS speech in LibriSpeech's layout: two speakers in train, one in dev."""
    assert shutil.which("flite") and shutil.which("sox"), "flite/sox are missing: run `make install`"
    root = tmp_path_factory.mktemp("flite") / "LibriSpeech"
    for part, spk, chap, voice in (("train-clean-100", "19", "198", "slt"), ("train-clean-100", "26", "495", "rms"),
                                   ("dev-clean", "84", "121", "awb")):
        d = root / part / spk / chap
        d.mkdir(parents=True)
        lines = []
        for n, text in enumerate(SENTENCES):
            utt = f"{spk}-{chap}-{n:04d}"
            wav = d / f"{utt}.wav"
            subprocess.run(["flite", "-voice", voice, "-t", text.lower(), "-o", str(wav)], check=True)
            subprocess.run(["sox", str(wav), "-r", "16000", "-c", "1", str(d / f"{utt}.flac")], check=True)
            wav.unlink()
            lines.append(f"{utt} {text}\n")
        (d / f"{spk}-{chap}.trans.txt").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def manifests(flite_corpus, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("manifests")
    return out, prepare_manifests(flite_corpus, out, nj=2)


def test_parts_and_cuts(manifests, flite_corpus):
    out, cuts = manifests
    assert sorted(cuts) == ["dev-clean", "train-clean-100"]
    train = list(load_manifest_lazy(cuts["train-clean-100"]))
    assert sorted(c.supervisions[0].speaker for c in train) == ["19"] * 3 + ["26"] * 3
    for cut in train:
        assert len(cut.supervisions) == 1 and cut.supervisions[0].text in SENTENCES
        assert cut.sampling_rate == 16000 and 0.5 < cut.duration < 5
        assert Path(cut.recording.sources[0].source).is_relative_to(flite_corpus.absolute())
    assert (out / "bad_inputs.jsonl").read_text() == ""


def test_stock_lhotse_cli_loads_manifests(manifests):
    """`lhotse validate --read-data` (loads the audio too) and `validate-pair` via lhotse's own click CLI."""
    from click.testing import CliRunner
    from lhotse.bin.lhotse import cli

    out, cuts = manifests
    for part in cuts:
        recs, sups = (str(manifest_path(out, kind, part)) for kind in ("recordings", "supervisions"))
        for args in (["validate", "--read-data", str(cuts[part])], ["validate-pair", recs, sups]):
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 0, (args, result.output, result.exception)


def test_lhotse_executable_describes_cuts(manifests):
    _, cuts = manifests
    run = subprocess.run([LHOTSE, "cut", "describe", str(cuts["train-clean-100"])], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "Cuts count:" in run.stdout and "│ 6 " in run.stdout


def test_rerun_returns_at_once(manifests, flite_corpus, caplog):
    out, cuts = manifests
    mtime = cuts["dev-clean"].stat().st_mtime_ns
    caplog.set_level(logging.INFO)
    assert prepare_manifests(flite_corpus, out, nj=2) == cuts
    assert "already in" in caplog.text
    assert cuts["dev-clean"].stat().st_mtime_ns == mtime


def test_other_corpus_in_same_output_dir_is_redone(manifests, flite_corpus, tmp_path):
    """A done-marker of another corpus must not make stale manifests look current."""
    out, _ = manifests
    other = tmp_path / "LibriSpeech"
    shutil.copytree(flite_corpus / "dev-clean", other / "dev-clean")
    (other / "dev-clean/84/121/84-121-0002.flac").unlink()
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    cuts = prepare_manifests(other, copy)
    assert sorted(cuts) == ["dev-clean"]
    assert [c.recording_id for c in load_manifest_lazy(cuts["dev-clean"])] == ["84-121-0000", "84-121-0001"]


def test_changed_corpus_is_redone_and_stage_2_follows(flite_corpus, tmp_path, caplog):
    """An in-place edit of a transcript or of an audio file makes the next run redo stage 1, then stage 2."""
    from fl_lib.data.clients import filter_cuts

    corpus, out = tmp_path / "LibriSpeech", tmp_path / "manifests"
    chapter = corpus / "dev-clean/84/121"
    shutil.copytree(flite_corpus / "dev-clean", corpus / "dev-clean")
    caplog.set_level(logging.INFO)

    def texts_and_durations() -> dict[str, tuple[str, float]]:
        cuts = filter_cuts(prepare_manifests(corpus, out)["dev-clean"], tmp_path / "sets/dev-clean.jsonl.gz")
        return {c.recording_id: (c.supervisions[0].text, c.duration) for c in load_manifest_lazy(cuts)}

    before = texts_and_durations()
    trans = chapter / "84-121.trans.txt"
    trans.write_text(trans.read_text().replace("OPEN THE DOOR", "CLOSE THE DOOR"))
    assert texts_and_durations()["84-121-0001"] == ("CLOSE THE DOOR", before["84-121-0001"][1])
    assert "made from other inputs or settings: redoing the stage" in caplog.text
    sf.write(chapter / "84-121-0002.flac", np.zeros(4000), 16000)  # same name, new audio
    assert texts_and_durations()["84-121-0002"] == (SENTENCES[2], 0.25)
    caplog.clear()
    texts_and_durations()
    assert "Manifests of" in caplog.text and "already filtered" in caplog.text


def test_cli(flite_corpus, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "fl_lib.bin.prepare_manifests", "--corpus_dir", str(flite_corpus),
         "--output_dir", str(tmp_path), "--nj", "2"],
        capture_output=True, text=True, check=True,
    )
    assert "(prepare_manifests:" in run.stderr and "INFO: train-clean-100:" in run.stderr
    assert manifest_path(tmp_path, "cuts", "dev-clean").is_file()


def test_help_imports_no_espnet_torch_or_lhotse():
    code = ("import sys, runpy; sys.argv = ['x', '--help']\n"
            "for m in ('check_corpus', 'prepare_manifests', 'split_clients', 'filter_cuts'):\n"
            "    try: runpy.run_module('fl_lib.bin.' + m, run_name='__main__')\n"
            "    except SystemExit: pass\n"
            "assert 'espnet' not in sys.modules and 'torch' not in sys.modules and 'lhotse' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=30)


def test_synthesized_corpus_chain(request):
    """The session fixtures: stage 0's synthesized corpus through stage 1."""
    cuts = request.getfixturevalue("tiny_manifests")
    assert {"train-clean-100", "dev-clean", "test-clean", "test-other"} <= set(cuts)
    for path in cuts.values():
        cut = next(iter(load_manifest_lazy(path)))
        assert cut.sampling_rate == 16000 and cut.load_audio().shape[1] == cut.num_samples
