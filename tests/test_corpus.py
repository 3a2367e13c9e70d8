"""Stage 0: the synthesized corpus has LibriSpeech's layout and the promised splits."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from fl_lib.corpus import voices
from fl_lib.corpus.grammar import CATEGORIES, partition_of, vocabulary
from fl_lib.corpus.synthesize import LM_TEXT, SUBSETS, CorpusConfig, make_plan, make_speakers, synthesize_corpus

REPO = Path(__file__).resolve().parents[1]
CORPUS_YAML = REPO / "egs/librispeech_fl/conf/corpus.yaml"


def transcripts(root: Path, subset: str) -> dict[str, str]:
    out = {}
    for trans in sorted((root / subset).glob("*/*/*.trans.txt")):
        for line in trans.read_text().splitlines():
            utt_id, text = line.split(" ", 1)
            out[utt_id] = text
    return out


def speakers_of(root: Path, subset: str) -> set[str]:
    return {p.name for p in (root / subset).iterdir()}


def test_layout_and_naming(tiny_corpus: Path) -> None:
    assert sorted(p.name for p in tiny_corpus.iterdir() if p.is_dir()) == sorted(SUBSETS)
    for subset in SUBSETS:
        chapters = list((tiny_corpus / subset).glob("*/*"))
        assert chapters, subset
        for chapter in chapters:
            speaker = chapter.parent.name
            assert speaker.isdigit() and chapter.name.isdigit()
            names = sorted(p.name for p in chapter.iterdir())
            assert f"{speaker}-{chapter.name}.trans.txt" in names
            flacs = [n for n in names if n.endswith(".flac")]
            assert flacs and len(flacs) == len(names) - 1
            assert all(re.fullmatch(rf"{speaker}-{chapter.name}-\d{{4}}\.flac", n) for n in flacs)


def test_audio_is_16k_mono_16bit_flac(tiny_corpus: Path) -> None:
    flacs = list(tiny_corpus.glob("*/*/*/*.flac"))
    assert flacs
    for flac in flacs:
        info = sf.info(str(flac))
        assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
        assert 0.8 < info.duration < 6.0, (flac, info.duration)


def test_transcripts_match_files(tiny_corpus: Path) -> None:
    vocab = vocabulary()
    for subset in SUBSETS:
        texts = transcripts(tiny_corpus, subset)
        files = {p.stem for p in (tiny_corpus / subset).glob("*/*/*.flac")}
        assert set(texts) == files
        for text in texts.values():
            assert text == text.upper() and re.fullmatch(r"[A-Z]+( [A-Z]+)*", text)
            assert set(text.split()) <= vocab


def test_tiny_config_sizes(tiny_corpus: Path) -> None:
    train = transcripts(tiny_corpus, "train-clean-100")
    per_speaker = {s: sum(u.startswith(s + "-") for u in train) for s in speakers_of(tiny_corpus, "train-clean-100")}
    assert len(per_speaker) == 4 and min(per_speaker.values()) >= 6
    assert len(speakers_of(tiny_corpus, "test-other")) == 2


def test_eval_sentences_unseen_in_training(tiny_corpus: Path) -> None:
    train = set(transcripts(tiny_corpus, "train-clean-100").values())
    dev = set(transcripts(tiny_corpus, "dev-clean").values())
    test = set(transcripts(tiny_corpus, "test-clean").values()) | set(transcripts(tiny_corpus, "test-other").values())
    assert dev and test
    assert not train & dev and not train & test and not dev & test


def test_lm_text_holds_training_sentences_only(tiny_corpus: Path) -> None:
    """The LM corpus, like LibriSpeech's, never holds a dev or test sentence."""
    lines = (tiny_corpus / LM_TEXT).read_text().splitlines()
    config = CorpusConfig.tiny()
    assert len(lines) == config.lm_sentences
    evals = set(transcripts(tiny_corpus, "dev-clean").values()) | set(transcripts(tiny_corpus, "test-clean").values())
    assert not evals & set(lines)
    assert set(" ".join(lines).split()) <= vocabulary() and len(set(lines)) > 100


def test_speaker_splits(tiny_corpus: Path) -> None:
    train = speakers_of(tiny_corpus, "train-clean-100")
    assert speakers_of(tiny_corpus, "dev-clean") == train == speakers_of(tiny_corpus, "test-clean")
    assert not speakers_of(tiny_corpus, "test-other") & train


def test_speakers_txt_and_json(tiny_corpus: Path) -> None:
    rows = [line for line in (tiny_corpus / "SPEAKERS.TXT").read_text().splitlines() if not line.startswith(";")]
    table = {}
    for row in rows:
        spk, sex, subset, minutes, name = (c.strip() for c in row.split("|"))
        table[spk] = (sex, subset, float(minutes), name)
    records = {str(r["speaker_id"]): r for r in json.loads((tiny_corpus / "speakers.json").read_text())}
    all_speakers = set().union(*(speakers_of(tiny_corpus, s) for s in SUBSETS))
    assert set(table) == set(records) == all_speakers
    for spk, (sex, subset, minutes, name) in table.items():
        record = records[spk]
        assert sex in ("F", "M") and minutes > 0
        assert name.startswith(record["base"]) and record["base"] in voices.BASES
        assert subset == ("test-other" if record["heldout"] else "train-clean-100")
    heldout = [r for r in records.values() if r["heldout"]]
    assert any(not r["base_seen_in_training"] for r in heldout)
    assert any(r["base_seen_in_training"] for r in heldout)


def test_lhotse_reads_all_parts(tiny_corpus: Path) -> None:
    from lhotse.recipes import prepare_librispeech

    manifests = prepare_librispeech(tiny_corpus, dataset_parts="auto")
    assert set(manifests) == set(SUBSETS)
    for subset, parts in manifests.items():
        assert len(parts["recordings"]) == len(transcripts(tiny_corpus, subset))
        assert len(parts["supervisions"]) == len(parts["recordings"])


def test_deterministic_for_a_seed(tiny_corpus: Path, tmp_path: Path) -> None:
    again = tmp_path / "same" / "LibriSpeech"
    synthesize_corpus(again, CorpusConfig.tiny(seed=0), nj=2)
    for subset in SUBSETS:
        assert transcripts(again, subset) == transcripts(tiny_corpus, subset)
    for flac in sorted(tiny_corpus.glob("*/*/*/*.flac")):
        a, _ = sf.read(str(flac), dtype="int16")
        b, _ = sf.read(str(again / flac.relative_to(tiny_corpus)), dtype="int16")
        assert (a == b).all(), flac
    assert (again / "SPEAKERS.TXT").read_text() == (tiny_corpus / "SPEAKERS.TXT").read_text()

    # Another seed: the plan alone shows the difference, no need to render it.
    other = CorpusConfig.tiny(seed=1)
    texts = {u.utt_id: u.text for u in make_plan(other, make_speakers(other)) if u.subset == "train-clean-100"}
    assert texts != transcripts(tiny_corpus, "train-clean-100")


def test_rerun_is_noop_and_config_change_is_refused(tiny_corpus: Path) -> None:
    assert synthesize_corpus(tiny_corpus, CorpusConfig.tiny(seed=0), nj=2)["skipped"] is True
    with pytest.raises(RuntimeError, match="different config"):
        synthesize_corpus(tiny_corpus, CorpusConfig.tiny(seed=5), nj=2)


def test_missing_tool_names_apt_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(voices.shutil, "which", lambda name: None if name == "festival" else f"/usr/bin/{name}")
    with pytest.raises(RuntimeError, match="apt-get install festival"):
        voices.check_tools({"festival:kal_diphone"})


def test_voice_bases_have_an_engine_binary_and_full_band() -> None:
    assert {base.engine for base in voices.BASES.values()} == set(voices.ENGINE_BINARY)
    # an 8 kHz voice resampled to 16 kHz would leave 4-8 kHz empty: an easy tell between speakers
    assert all(base.rate >= voices.SAMPLE_RATE for base in voices.BASES.values())


def test_missing_espeak_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(voices.shutil, "which", lambda name: None if name == "espeak-ng" else f"/usr/bin/{name}")
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng$"):
        voices.check_tools({"espeak:en-us+f3"})


def test_default_config_file() -> None:
    config = CorpusConfig.from_yaml(CORPUS_YAML, seed=7)
    assert config.seed == 7
    assert config.num_train_speakers >= 16 and config.num_heldout_speakers >= 4
    assert set(config.heldout_voices) - set(config.train_voices), "want a voice base unseen in training"
    assert set(config.train_voices) | set(config.heldout_voices) <= set(voices.BASES)


def test_unknown_config_key_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "corpus.yaml"
    bad.write_text("seed: 1\nnum_speakers: 3\n")
    with pytest.raises(ValueError, match="unknown corpus config keys.*num_speakers"):
        CorpusConfig.from_yaml(bad)


def test_grammar_vocabulary_is_small_and_complete() -> None:
    import random

    rng = random.Random(0)
    produced = {w for gen in CATEGORIES.values() for _ in range(3000) for w in gen(rng).split()}
    assert produced == vocabulary()
    assert 80 <= len(produced) <= 120


def test_cli_help_imports_no_espnet_or_torch() -> None:
    code = ("import sys, fl_lib.corpus.synthesize, fl_lib.bin.synthesize_corpus; "
            "assert not any(m.startswith(('espnet', 'torch')) for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    out = subprocess.run([sys.executable, "-m", "fl_lib.bin.synthesize_corpus", "--help"],
                         check=True, capture_output=True, text=True, cwd=REPO, timeout=20).stdout
    assert "--output_dir" in out and "--nj" in out


def test_the_study_corpus_has_64_speakers_one_client_each_and_keeps_eval_sentences_out_of_training() -> None:
    """conf/corpus_fl64.yaml, the convergence study's federation, planned as stage 0 would render it."""
    study = CorpusConfig.from_yaml(REPO / "egs/librispeech_fl/conf/corpus_fl64.yaml")
    speakers = make_speakers(study)
    plan = make_plan(study, speakers)
    train = [u for u in plan if u.subset == "train-clean-100"]
    per_speaker = {}
    for u in train:
        per_speaker.setdefault(u.speaker.speaker_id, []).append(u)
    assert len(per_speaker) == 64  # one client per speaker: stage 2 groups train-clean-100 by speaker
    assert all(8 <= len(utts) <= 30 for utts in per_speaker.values())
    # about the demo corpus's amount of training speech, spread over 4x the speakers
    demo = make_plan(CorpusConfig.from_yaml(CORPUS_YAML), make_speakers(CorpusConfig.from_yaml(CORPUS_YAML)))
    assert 0.8 < len(train) / sum(u.subset == "train-clean-100" for u in demo) < 1.2
    train_text = {u.text for u in train}
    for subset in ("dev-clean", "test-clean"):
        evals = [u for u in plan if u.subset == subset]
        assert {u.speaker.speaker_id for u in evals} == set(per_speaker)
        assert not train_text & {u.text for u in evals}, subset
    assert {u.speaker.speaker_id for u in plan if u.subset == "test-other"}.isdisjoint(per_speaker)


# sha256 of each librispeech_fl corpus config's config record, speakers, plan (ids, parts, speakers,
# sentences) and LM text, computed before heldout_distinct_sentences existed: options added for the
# session corpora must leave these corpora, and the .done records of corpora already synthesized, as they were.
LIBRISPEECH_FL_PLANS = {
    "corpus.yaml": "3de2a47cd468bd20843aa36a7fa21ba18a52649be5890f0ba956d1eb5ad2181d",
    "corpus_fl64.yaml": "9ba39c72740773a4237d748597dd7babf0dfba96cb7e545a3c591e563442fb09",
    "corpus_tiny.yaml": "298b54bb342a2f6a8e9ee035a39cf8a377af987c8ba701b3154f9238963a9c6a",
}


def plan_digest(config: CorpusConfig) -> str:
    import hashlib
    import random
    from dataclasses import asdict

    from fl_lib.corpus.grammar import lm_sentences

    speakers = make_speakers(config)
    plan = make_plan(config, speakers)
    lm = lm_sentences(random.Random(f"{config.seed}:lm_text"), config.lm_sentences, config.eval_fraction)
    blob = json.dumps({"config": config.to_dict(), "speakers": [asdict(s) for s in speakers],
                       "plan": [[u.utt_id, u.subset, u.speaker.speaker_id, u.text] for u in plan], "lm": lm},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(LIBRISPEECH_FL_PLANS))
def test_librispeech_fl_corpus_plans_are_unchanged(name: str) -> None:
    config = CorpusConfig.from_yaml(REPO / "egs/librispeech_fl/conf" / name)
    assert "heldout_distinct_sentences" not in config.to_dict()  # a key at its default stays out of .done
    assert plan_digest(config) == LIBRISPEECH_FL_PLANS[name]


def test_heldout_distinct_sentences_are_distinct_test_sentences_even_when_categories_run_out() -> None:
    import random

    from fl_lib.corpus.grammar import NoSentenceLeft, distinct_sentences

    config = CorpusConfig(num_train_speakers=1, num_heldout_speakers=6, heldout_utts=(150, 150),
                          heldout_distinct_sentences=True, lm_sentences=0)
    assert config.to_dict()["heldout_distinct_sentences"] is True
    plan = make_plan(config, make_speakers(config))
    texts = [u.text for u in plan if u.subset == "test-other"]
    assert len(texts) == len(set(texts)) == 900
    assert {partition_of(t, config.eval_fraction) for t in texts} == {"test"}
    assert any(t.endswith(" DOOR") or t.endswith(" WINDOWS") for t in texts)  # a small category, used up
    plain = CorpusConfig(num_train_speakers=1, num_heldout_speakers=6, heldout_utts=(150, 150), lm_sentences=0)
    plain_texts = [u.text for u in make_plan(plain, make_speakers(plain)) if u.subset == "test-other"]
    assert len(set(plain_texts)) < len(plain_texts)  # without the option, sentences repeat
    used: set[str] = set()
    with pytest.raises(NoSentenceLeft, match="no unused sentence left after"):
        distinct_sentences(random.Random(0), {"doors": 1.0}, 100, "test", 0.2, used, set())
    assert len(used) < 100
    with pytest.raises(ValueError, match="heldout_distinct_sentences must be true or false"):
        CorpusConfig(heldout_distinct_sentences="yes")
