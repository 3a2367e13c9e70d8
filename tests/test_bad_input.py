"""Stage 0/1 bad inputs: each either stops with a message naming the file, or is skipped and counted."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
from lhotse import load_manifest_lazy

from fl_lib.data.corpus_check import CorpusError, CorpusLayoutError, TranscriptEncodingError, check_corpus_layout
from fl_lib.data.manifests import prepare_manifests

CHAPTER = "train-clean-100/19/198"


def add_utt(
    root: Path, utt_id: str, text: str | None, sr: int = 16000, seconds: float = 0.5, part: str = "train-clean-100",
    channels: int = 1,
) -> Path:
    """Write <part>/SPK/CHAP/SPK-CHAP-NNNN.flac (a tone) and, unless text is None, its transcript line."""
    spk, chap, _ = utt_id.split("-")
    d = root / part / spk / chap
    d.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sr * seconds)) / sr
    flac = d / f"{utt_id}.flac"
    tone = 0.1 * np.sin(2 * np.pi * 220 * t)
    sf.write(flac, np.stack([tone] * channels, axis=1), sr)
    if text is not None:
        with open(d / f"{spk}-{chap}.trans.txt", "a", encoding="utf-8") as f:
            f.write(f"{utt_id} {text}\n")
    return flac


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "LibriSpeech"
    for n in range(2):
        add_utt(root, f"19-198-{n:04d}", "GOOD TEXT")
    return root


def trans(root: Path) -> Path:
    return root / CHAPTER / "19-198.trans.txt"


def corrupt(root):
    add_utt(root, "19-198-0009", "CORRUPT").write_bytes(b"fLaC this is not audio")


def empty_file(root):
    add_utt(root, "19-198-0009", "EMPTY FILE").write_bytes(b"")


def zero_frames(root):
    """A FLAC header with no audio frames, as sox writes it."""
    assert shutil.which("sox"), "sox is missing: run `make install`"
    flac = add_utt(root, "19-198-0009", "NO FRAMES")
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", str(flac), "trim", "0", "0"], check=True)


def missing_audio(root):
    add_utt(root, "19-198-0009", "NO AUDIO").unlink()


def no_transcript(root):
    add_utt(root, "19-198-0009", None)


def empty_transcript(root):
    add_utt(root, "19-198-0009", "")


def wrong_rate(root):
    add_utt(root, "19-198-0009", "EIGHT KILOHERTZ", sr=8000)


def truncated(root):
    """The first half of a FLAC file's bytes: its header is intact and still gives every sample."""
    flac = add_utt(root, "19-198-0009", "HALF A FILE", seconds=2.0)
    flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    assert sf.info(str(flac)).frames == 32000


def stereo(root):
    add_utt(root, "19-198-0009", "TWO CHANNELS", channels=2)


def blank_line(root):
    with open(trans(root), "a") as f:
        f.write("\n")


SKIPPED: list[tuple[Callable[[Path], None], str, str | None, str]] = [
    # spoil, problem, utt id, text the warning must hold
    (corrupt, "corrupt_audio", "19-198-0009", "19-198-0009.flac"),
    (empty_file, "corrupt_audio", "19-198-0009", "19-198-0009.flac"),
    (zero_frames, "empty_audio", "19-198-0009", "19-198-0009.flac"),
    (missing_audio, "missing_audio", "19-198-0009", "19-198-0009.flac"),
    (no_transcript, "no_transcript", "19-198-0009", "19-198-0009.flac"),
    (empty_transcript, "empty_transcript", "19-198-0009", "19-198.trans.txt:3"),
    (wrong_rate, "wrong_sample_rate", "19-198-0009", "8000 Hz, expected 16000 Hz"),
    (truncated, "truncated_audio", "19-198-0009", "19-198-0009.flac"),
    (stereo, "not_mono", "19-198-0009", "2 channels, expected 1"),
    (blank_line, "blank_line", None, "19-198.trans.txt:3"),
]


@pytest.mark.parametrize("spoil, problem, utt_id, named", SKIPPED, ids=[s[1] + "-" + s[0].__name__ for s in SKIPPED])
def test_bad_item_is_skipped_reported_and_counted(corpus, tmp_path, caplog, spoil, problem, utt_id, named):
    spoil(corpus)
    caplog.set_level(logging.INFO)
    cuts = prepare_manifests(corpus, tmp_path / "manifests")["train-clean-100"]

    assert sorted(c.recording_id for c in load_manifest_lazy(cuts)) == ["19-198-0000", "19-198-0001"]
    for cut in load_manifest_lazy(cuts):  # sources point at the real corpus, not the filtered view
        assert Path(cut.recording.sources[0].source) == (corpus / CHAPTER / f"{cut.recording_id}.flac").absolute()
        assert cut.load_audio().shape[1] == 8000
    assert not (tmp_path / "manifests/filtered_corpus").exists()
    report = [json.loads(line) for line in (tmp_path / "manifests/bad_inputs.jsonl").read_text().splitlines()]
    assert [(r["part"], r["utt_id"], r["problem"]) for r in report] == [("train-clean-100", utt_id, problem)]
    assert named in report[0]["file"] + " " + report[0]["detail"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(named in w and problem in w for w in warnings)
    assert any(f"'{problem}': 1" in w for w in warnings)  # per-kind counts


def test_non_utf8_transcript_stops_naming_file_line_and_offset(corpus, tmp_path):
    with open(trans(corpus), "ab") as f:
        f.write(b"19-198-0002 CAF\xe9 LATIN1\n")
    with pytest.raises(TranscriptEncodingError) as err:
        prepare_manifests(corpus, tmp_path / "manifests")
    offset = len("19-198-0000 GOOD TEXT\n") * 2 + len("19-198-0002 CAF")
    assert f"{trans(corpus)}: line 3 (byte offset {offset})" in str(err.value)
    assert not (tmp_path / "manifests/librispeech_cuts_train-clean-100.jsonl.gz").exists()


def test_missing_corpus_dir_stops(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CorpusLayoutError, match=f"{missing} does not exist"):
        prepare_manifests(missing, tmp_path / "manifests")


def test_dir_without_subsets_stops_and_hints(tmp_path):
    add_utt(tmp_path / "LibriSpeech", "19-198-0000", "GOOD TEXT")
    with pytest.raises(CorpusLayoutError, match="No LibriSpeech subset directory") as err:
        check_corpus_layout(tmp_path)
    assert f"did you mean {tmp_path / 'LibriSpeech'}" in str(err.value)
    assert check_corpus_layout(tmp_path / "LibriSpeech") == ["train-clean-100"]


def test_cli_errors_are_one_clear_line(tmp_path):
    for module, extra in (("check_corpus", []), ("prepare_manifests", ["--output_dir", str(tmp_path / "m")])):
        run = subprocess.run(
            [sys.executable, "-m", f"fl_lib.bin.{module}", "--corpus_dir", str(tmp_path / "nope"), *extra],
            capture_output=True, text=True,
        )
        assert run.returncode == 1
        assert f"ERROR: Corpus directory {tmp_path / 'nope'} does not exist" in run.stderr
        assert "Traceback" not in run.stderr


def test_several_problems_at_once_and_other_parts_untouched(corpus, tmp_path, caplog):
    corrupt(corpus)
    add_utt(corpus, "19-198-0010", "", sr=8000)
    add_utt(corpus, "20-200-0000", "DEV", part="dev-clean")
    caplog.set_level(logging.INFO)
    cuts = prepare_manifests(corpus, tmp_path / "manifests", nj=2)
    assert [c.recording_id for c in load_manifest_lazy(cuts["dev-clean"])] == ["20-200-0000"]
    assert len(list(load_manifest_lazy(cuts["train-clean-100"]))) == 2
    assert "{'corrupt_audio': 1, 'empty_transcript': 1}" in caplog.text


def flat_part(root):
    (root / "train-clean-100/19/198").rename(root / "flat")
    for path in (root / "flat").iterdir():
        path.rename(root / "train-clean-100" / path.name)


def speaker_dirs_only(root):
    (root / "train-clean-100/19/198").rename(root / "train-clean-100/198")
    for path in (root / "train-clean-100/198").iterdir():
        path.rename(root / "train-clean-100/19" / path.name)


def no_trans_file(root):
    trans(root).unlink()


def no_flac_file(root):
    for flac in (root / CHAPTER).glob("*.flac"):
        flac.unlink()


def empty_part(root):
    (root / "dev-clean").mkdir()


LAYOUTS = [
    # spoil, part, text the error must hold
    (flat_part, "train-clean-100", "flac files not in SPEAKER/CHAPTER dirs"),
    (speaker_dirs_only, "train-clean-100", "flac files not in SPEAKER/CHAPTER dirs"),
    (no_trans_file, "train-clean-100", "holds no SPEAKER-CHAPTER.trans.txt transcript (audio e.g. 19/198/19-198-000"),
    (no_flac_file, "train-clean-100", "holds no .flac file next to its transcripts (e.g. 19/198/19-198.trans.txt)"),
    (empty_part, "dev-clean", "holds no .flac or .trans.txt file"),
]


@pytest.mark.parametrize("spoil, part, problem", LAYOUTS, ids=[s[0].__name__ for s in LAYOUTS])
def test_part_without_librispeech_layout_stops_naming_part(corpus, tmp_path, spoil, part, problem):
    spoil(corpus)
    with pytest.raises(CorpusLayoutError) as err:
        prepare_manifests(corpus, tmp_path / "manifests")
    assert str(err.value).startswith(f"{corpus / part} {problem}")
    assert "SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.flac" in str(err.value)
    assert not (tmp_path / "manifests").exists()


def test_part_with_only_bad_utterances_stops_naming_part_and_counts(corpus, tmp_path):
    """lhotse's recipe would fail an assertion on the empty filtered view; CorpusError says why instead."""
    for flac in (corpus / CHAPTER).glob("*.flac"):
        flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    empty_transcript(corpus)
    with pytest.raises(CorpusError) as err:
        prepare_manifests(corpus, tmp_path / "manifests")
    report = tmp_path / "manifests/bad_inputs.jsonl"
    assert str(err.value) == (
        f"{corpus / 'train-clean-100'}: no usable utterance (3 skipped inputs: "
        f"{{'empty_transcript': 1, 'truncated_audio': 2}}; details in {report}). Fix the inputs or remove the part."
    )
    assert len(report.read_text().splitlines()) == 3
    assert not list((tmp_path / "manifests").glob("*.jsonl.gz"))

    run = subprocess.run(
        [sys.executable, "-m", "fl_lib.bin.prepare_manifests", "--corpus_dir", str(corpus),
         "--output_dir", str(tmp_path / "cli")], capture_output=True, text=True,
    )
    assert run.returncode == 1
    assert f"ERROR: {corpus / 'train-clean-100'}: no usable utterance (3 skipped inputs" in run.stderr
    assert "Traceback" not in run.stderr and "AssertionError" not in run.stderr
