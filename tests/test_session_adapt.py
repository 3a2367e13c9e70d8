"""fl_lib.adapt: session split (truth out of reach), adaptation config, label selection, results."""
from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from fl_lib.adapt.config import AdaptConfig
from fl_lib.adapt.select import keep, select_labels
from fl_lib.adapt.sessions import load_sessions, split_sessions


def _cut(utt: str, speaker: str, text: str, duration: float = 2.0) -> dict:
    return {"id": utt, "start": 0, "duration": duration, "channel": 0, "type": "MonoCut",
            "supervisions": [{"id": utt, "recording_id": utt, "start": 0.0, "duration": duration, "channel": 0,
                              "text": text, "speaker": speaker}],
            "recording": {"id": utt, "sources": [{"type": "file", "channels": [0], "source": f"/x/{utt}.flac"}],
                          "sampling_rate": 16000, "num_samples": int(16000 * duration), "duration": duration}}


def _write(path: Path, cuts: list) -> Path:
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(c) + "\n" for c in cuts)
    return path


def _read(path: Path) -> list:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def _corpus(tmp_path: Path, text=lambda spk, i: f"WORDS OF {spk} NUMBER {i}") -> Path:
    cuts = [_cut(f"{spk}-1-{i:04d}", spk, text(spk, i)) for spk in ("2001", "2002") for i in range(10)]
    for cut in cuts:  # a word alignment spells the transcript as well
        words = cut["supervisions"][0]["text"].split()
        cut["supervisions"][0]["alignment"] = {"word": [[w, 0.1 * k, 0.1, 1.0] for k, w in enumerate(words)]}
    return _write(tmp_path / "cuts.jsonl.gz", cuts)


def test_adaptation_parts_hold_no_transcripts_and_do_not_depend_on_them(tmp_path):
    """The truth is never read: garbage transcripts give byte-identical adaptation manifests."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    real = split_sessions(_corpus(tmp_path / "a"), tmp_path / "a/out", 0.7, seed=3)
    garbage = split_sessions(_corpus(tmp_path / "b", lambda s, i: f"GARBAGE {i * 7919 % 13} ZZ"),
                             tmp_path / "b/out", 0.7, seed=3)
    for s_real, s_garbage in zip(load_sessions(real), load_sessions(garbage)):
        with gzip.open(s_real.adapt, "rb") as a, gzip.open(s_garbage.adapt, "rb") as b:
            assert a.read() == b.read()
        for cut in _read(s_real.adapt):
            assert all("text" not in sup and "alignment" not in sup for sup in cut["supervisions"])
    truth = (tmp_path / "a/out/truth/adapt_text").read_text()
    assert "WORDS OF 2001" in truth and "GARBAGE" in (tmp_path / "b/out/truth/adapt_text").read_text()


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    cuts = _corpus(tmp_path)
    first = load_sessions(split_sessions(cuts, tmp_path / "s1", 0.7, seed=1))
    again = load_sessions(split_sessions(cuts, tmp_path / "s1b", 0.7, seed=1))
    other = load_sessions(split_sessions(cuts, tmp_path / "s2", 0.7, seed=2))
    for s, s_again, s_other in zip(first, again, other):
        adapt = {c["id"] for c in _read(s.adapt)}
        dev = {c["id"] for c in _read(s.dev)}
        test = {c["id"] for c in _read(s.test)}
        assert (len(adapt), len(dev), len(test)) == (s.num_adapt, s.num_dev, s.num_test) == (7, 1, 2)
        assert not adapt & test and not adapt & dev and not dev & test
        assert adapt | dev | test == {f"{s.id}-1-{i:04d}" for i in range(10)}
        assert adapt == {c["id"] for c in _read(s_again.adapt)}
        assert all("text" in c["supervisions"][0] for c in _read(s.test) + _read(s.dev))
    assert any({c["id"] for c in _read(a.adapt)} != {c["id"] for c in _read(b.adapt)} for a, b in zip(first, other))
    assert len(_read(tmp_path / "s1/test.jsonl.gz")) == 4 and len(_read(tmp_path / "s1/dev.jsonl.gz")) == 2
    with pytest.raises(ValueError, match="leave a test part"):
        split_sessions(cuts, tmp_path / "s3", 0.7, dev_fraction=0.3)


def test_session_without_usable_utterances_is_skipped_and_logged(tmp_path, caplog):
    cuts = [_cut(f"2001-1-{i:04d}", "2001", "A B") for i in range(4)]
    cuts += [_cut(f"2002-1-{i:04d}", "2002", "A B", duration=30.0) for i in range(4)]  # all too long
    cuts += [_cut("2003-1-0000", "2003", "A B")]  # one utterance: nothing left to test on
    cuts += [_cut(f"2004-1-{i:04d}", "2004", f"C {i}") for i in range(2)]  # two: no dev part
    with caplog.at_level(logging.WARNING):
        sessions = load_sessions(split_sessions(_write(tmp_path / "c.jsonl.gz", cuts), tmp_path / "out",
                                                max_duration=20.0))
    assert [s.id for s in sessions] == ["2001"]
    assert "session 2002 skipped: 0 usable utterance(s) (4 outside" in caplog.text
    assert "session 2003 skipped: 1 usable utterance(s)" in caplog.text
    assert "session 2004 skipped: 2 usable utterance(s)" in caplog.text


@pytest.mark.parametrize("conf", [
    {"filter": "none", "confidence": "k2"},                                  # confidence unused
    {"filter": "top_fraction", "confidence": "k2", "top_fraction": 0.5, "threshold": 0.2},  # threshold unused
    {"filter": "threshold", "confidence": "k2", "threshold": 0.5, "top_fraction": 0.5},     # top_fraction unused
    {"filter": "threshold", "threshold": 0.5},                               # no confidence to threshold
    {"labels": "oracle", "filter": "top_fraction", "confidence": "k2", "top_fraction": 0.5},
    {"labels": "oracle", "generations": 2},
    {"filter": "top_fraction", "confidence": "lm", "top_fraction": 0.5},
    {"filter": "top_fraction", "confidence": "k2", "top_fraction": 0.0},
    {"generations": 0},
    {"fliter": "none"},
    {"filter": "top_fraction", "confidence": "k2_lm", "top_fraction": 0.5, "ngram_order": 3},  # no lm_weight
    {"filter": "top_fraction", "confidence": "k2_lm", "top_fraction": 0.5, "ngram_order": 3, "lm_weight": 0},
    {"filter": "top_fraction", "confidence": "k2", "top_fraction": 0.5, "ngram_order": 3},     # k2_lm's key
    {"filter": "top_fraction", "confidence": "beam_score", "top_fraction": 0.5, "lm_weight": 0.5},
    {"filter": "top_fraction", "confidence": "beam_score", "top_fraction": 0.5, "rank_by": "weakest_token"},  # no tokens
    {"filter": "none", "rank_by": "weakest_token"},                          # nothing ranked
    {"labels": "oracle", "rank_by": "weakest_token"},
    {"filter": "top_fraction", "confidence": "k2", "top_fraction": 0.5, "rank_by": "word"},
])
def test_adapt_config_rejects_options_that_do_nothing_or_make_no_sense(conf):
    with pytest.raises(ValueError):
        AdaptConfig.from_yaml(None, [f"{k}={v}" for k, v in conf.items()])


def test_adapt_config_files_of_the_recipe_load():
    for path in sorted((Path(__file__).resolve().parents[1] / "egs/session_adapt/conf").glob("adapt*.yaml")):
        AdaptConfig.from_yaml(path)


def test_the_adapt_config_tool_saves_the_config_and_prints_the_keys_asked_in_order(tmp_path, capsys):
    from fl_lib.bin.adapt_config import main

    conf = Path(__file__).resolve().parents[1] / "egs/session_adapt/conf/adapt_k2_lm.yaml"
    main(["--config", str(conf), "--save", str(tmp_path / "a.json"), "--get", "lm_weight,generations,labels",
          "generations=3"])
    saved = json.loads((tmp_path / "a.json").read_text())
    assert capsys.readouterr().out.split("\n") == [str(saved["lm_weight"]), "3", saved["labels"], ""]
    assert saved == AdaptConfig.from_yaml(conf, ["generations=3"]).to_dict()
    with pytest.raises(SystemExit, match="unknown key.* nope"):
        main(["--config", str(conf), "--get", "labels,nope"])


def _hyps(rows):
    return [{"utt_id": u, "text": t, "confidence": c} for u, t, c in rows]


def test_keep_by_top_fraction_threshold_and_none():
    rows = _hyps([("a", "X", 0.9), ("b", "Y", 0.2), ("c", "Z", 0.6), ("d", "", 0.99), ("e", "W", 0.4)])
    top = AdaptConfig(confidence="k2", filter="top_fraction", top_fraction=0.5)
    assert [r["utt_id"] for r in keep(rows, top)] == ["a", "c"]  # ceil(0.5 * 4 non-empty)
    thr = AdaptConfig(confidence="k2", filter="threshold", threshold=0.5)
    assert sorted(r["utt_id"] for r in keep(rows, thr)) == ["a", "c"]
    assert sorted(r["utt_id"] for r in keep(rows, AdaptConfig())) == ["a", "b", "c", "e"]  # empty never kept


def _labels(tmp_path, sessions, conf_of):
    hyps, conf = [], []
    for s in load_sessions(sessions):
        for c in _read(s.adapt):
            hyps.append({"utt_id": c["id"], "session": s.id, "text": f"HYP {c['id']}", "token_int": [1]})
            conf.append({"utt_id": c["id"], "method": "k2", "log_posterior": 0.0, "num_tokens": 1,
                         "confidence": conf_of(s.id, c["id"])})
    (tmp_path / "hyps.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hyps))
    (tmp_path / "confidence.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conf))
    return tmp_path / "hyps.jsonl", tmp_path / "confidence.jsonl"


def test_session_with_every_label_filtered_out_is_skipped_and_counted(tmp_path, caplog):
    sessions = split_sessions(_corpus(tmp_path), tmp_path / "sessions", 0.7, seed=0)
    hyps, conf = _labels(tmp_path, sessions, lambda spk, utt: 0.9 if spk == "2001" else 0.1)
    cfg = AdaptConfig(confidence="k2", filter="threshold", threshold=0.5)
    with caplog.at_level(logging.INFO):
        clients = select_labels(sessions, cfg, tmp_path / "clients", hyps, conf)
    rows = [json.loads(line) for line in clients.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["2001"]
    selection = json.loads((tmp_path / "clients/selection.json").read_text())
    assert selection["skipped_sessions"] == ["2002"]
    assert "session 2002: keeps 0 of 7 pseudo-labels" in caplog.text
    assert "1 of 2 sessions skipped with no kept pseudo-label" in caplog.text
    cuts = _read(tmp_path / "clients" / rows[0]["manifest"])
    assert len(cuts) == 7 and all(c["supervisions"][0]["text"] == f"HYP {c['id']}" for c in cuts)
    with pytest.raises(ValueError, match="every session's pseudo-labels were filtered out"):
        select_labels(sessions, AdaptConfig(confidence="k2", filter="threshold", threshold=0.95),
                      tmp_path / "none", hyps, conf)


def test_pseudo_labels_never_take_the_truth_and_oracle_takes_only_the_truth(tmp_path):
    sessions = split_sessions(_corpus(tmp_path), tmp_path / "sessions", 0.7, seed=0)
    hyps, _ = _labels(tmp_path, sessions, lambda spk, utt: 1.0)
    truth = tmp_path / "sessions/truth/adapt_text"
    with pytest.raises(ValueError, match="never the true transcripts"):
        select_labels(sessions, AdaptConfig(), tmp_path / "x", hyps, oracle_text=truth)
    oracle = AdaptConfig(labels="oracle")
    with pytest.raises(ValueError, match="no hypotheses"):
        select_labels(sessions, oracle, tmp_path / "y", hyps, oracle_text=truth)
    clients = select_labels(sessions, oracle, tmp_path / "oracle", oracle_text=truth)
    for row in map(json.loads, clients.read_text().splitlines()):
        for c in _read(tmp_path / "oracle" / row["manifest"]):
            assert c["supervisions"][0]["text"].startswith(f"WORDS OF {row['id']}")


def test_werr_and_the_per_session_table(tmp_path):
    """WERR = (seed - adapted) / seed per session, listed, never averaged; pooled over sessions (word-weighted)
    with a bootstrap interval over sessions; one table per decoding."""
    from fl_lib.adapt.results import make_session_results, render_ablation, werr
    from fl_lib.asr.scoring import ErrorStats

    assert werr(50.0, 40.0) == pytest.approx(20.0)
    assert werr(0.0, 10.0) is None
    sessions = split_sessions(_corpus(tmp_path), tmp_path / "sessions", 0.7, seed=0)

    def score_json(path, errors, words=100):
        per = {spk: ErrorStats(snt=3, wrd=words, corr=words - e, sub=e).to_dict() for spk, e in errors.items()}
        path.write_text(json.dumps({"per_speaker_wer": per}))
        return path

    seed = score_json(tmp_path / "seed.json", {"2001": 50, "2002": 20})
    adapted = score_json(tmp_path / "adapted.json", {"2001": 40, "2002": 22})
    same = score_json(tmp_path / "same.json", {"2001": 40, "2002": 16}, 200)  # 20 % WERR in both sessions
    same_seed = score_json(tmp_path / "same_seed.json", {"2001": 50, "2002": 20}, 200)
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "adapt_config.json").write_text(json.dumps(AdaptConfig(labels="oracle").to_dict()))
    decodings = {"LM fusion": (seed, adapted), "acoustic model alone": (same_seed, same)}
    text = make_session_results(sessions, decodings, exp, wall_seconds=90).read_text()
    assert "|2001|7|2|50.0|40.0|20.0|" in text and "|2002|7|2|20.0|22.0|-10.0|" in text
    assert "mean over sessions" not in text
    # Pooled: (70 - 62) / 70 = 11.4 %; resampling two sessions, the 2.5 % and 97.5 % quantiles fall on the
    # resamples of one session twice (probability 1/4 each): -10 % and 20 %.
    assert "|**pooled words**|||35.0|31.0|**11.4**|" in text
    assert "WERR 11.4 %**, 95 % bootstrap interval over sessions [-10.0, 20.0]" in text
    assert "### WER on the sessions' test parts: acoustic model alone" in text
    assert "WERR 20.0 %**, 95 % bootstrap interval over sessions [20.0, 20.0]" in text
    table = render_ablation([exp])
    assert "|exp|oracle transcripts|LM fusion|n/a|all|0.0 (truth)|35.0|31.0|11.4|[-10.0, 20.0]|1.5|" in table
    assert "|exp|oracle transcripts|acoustic model alone|n/a|all|0.0 (truth)|17.5|14.0|20.0|[20.0, 20.0]|1.5|" in table
    make_session_results(sessions, decodings, exp, student_config="conf/student_specaug.yaml")
    assert "|exp|oracle transcripts + student student_specaug|" in render_ablation([exp])


def test_student_config_adds_training_only_noise_and_nothing_else(tmp_path):
    import yaml

    from fl_lib.adapt.seed import SeedError, student_asr_config

    (tmp_path / "adapt_asr_config.yaml").write_text(yaml.safe_dump({"encoder": "conformer", "init_param": ["s.pth"]}))
    recipe = Path(__file__).resolve().parents[1] / "egs/session_adapt/conf/student_specaug.yaml"
    out = yaml.safe_load(student_asr_config(tmp_path, recipe, tmp_path / "student.yaml").read_text())
    assert out["specaug"] == "specaug" and out["init_param"] == ["s.pth"] and out["encoder"] == "conformer"
    (tmp_path / "bad.yaml").write_text("encoder: transformer\n")
    with pytest.raises(SeedError, match="would change the seed's model"):
        student_asr_config(tmp_path, tmp_path / "bad.yaml", tmp_path / "x.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(SeedError, match="would do nothing"):
        student_asr_config(tmp_path, tmp_path / "empty.yaml", tmp_path / "y.yaml")


def test_freeze_upper_student_trains_only_the_lower_encoder(tmp_path, tiny_tokens):
    """conf/student_freeze_upper.yaml on the seed recipe's conformer: the input layer and blocks
    0-1 stay trainable; blocks 2-3, the last norm and the CTC head are frozen, and nothing else."""
    import yaml

    from fl_lib.adapt.seed import student_asr_config
    from fl_lib.asr.model import build_asr_args, build_asr_model

    root = Path(__file__).resolve().parents[1]
    seed_config = yaml.safe_load((root / "egs/librispeech_fl/conf/train_asr_conformer_ctc.yaml").read_text())
    seed_config["normalize"] = None  # no feature statistics here; normalization has no parameters
    (tmp_path / "adapt_asr_config.yaml").write_text(yaml.safe_dump(seed_config))
    student = student_asr_config(tmp_path, root / "egs/session_adapt/conf/student_freeze_upper.yaml",
                                 tmp_path / "student.yaml")
    bpemodel, token_list = tiny_tokens
    model = build_asr_model(build_asr_args(student, token_list, bpemodel, None))
    upper = ("encoder.encoders.2.", "encoder.encoders.3.", "encoder.after_norm.", "ctc.")
    lower = ("encoder.embed.", "encoder.encoders.0.", "encoder.encoders.1.")
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if not p.requires_grad} == {n for n in params if n.startswith(upper)}
    assert {n for n, p in params.items() if p.requires_grad} == {n for n in params if n.startswith(lower)}
    assert all(any(n.startswith(prefix) for n in params) for prefix in upper + lower)


# Clean splits: no sentence in two parts of a session, no dev or test sentence in any adaptation part.

RECIPE = Path(__file__).resolve().parents[1] / "egs/session_adapt"


def _part_sentences(sessions_path: Path) -> dict:
    """{session: {part: [sentence of each utterance]}}; the adaptation text comes from truth/adapt_text."""
    from fl_lib.adapt.select import read_text_table
    from fl_lib.adapt.sessions import sentence

    truth = read_text_table(Path(sessions_path).parent / "truth/adapt_text")
    out = {}
    for s in load_sessions(sessions_path):
        out[s.id] = {"adapt": [" ".join(truth[c["id"]].upper().split()) for c in _read(s.adapt)],
                     "dev": [sentence(c) for c in _read(s.dev)], "test": [sentence(c) for c in _read(s.test)]}
    return out


def assert_clean(sessions_path: Path) -> None:
    parts = _part_sentences(sessions_path)
    adapted = {t for p in parts.values() for t in p["adapt"]}
    for session, p in parts.items():
        adapt, dev, test = set(p["adapt"]), set(p["dev"]), set(p["test"])
        assert not adapt & dev and not adapt & test and not dev & test, session
        assert not (dev | test) & adapted, session  # no dev or test sentence in any session's adaptation audio


def _session_cuts_from_plan(plan, tmp_path: Path) -> Path:
    return _write(tmp_path / "plan_cuts.jsonl.gz",
                  [_cut(u.utt_id, str(u.speaker.speaker_id), u.text) for u in plan if u.subset == "test-other"])


def test_default_session_corpus_has_12_held_out_voices_reading_distinct_unseen_sentences(tmp_path):
    """conf/corpus.yaml, split as run.sh splits it: clean, and no utterance lost."""
    from fl_lib.corpus.grammar import partition_of
    from fl_lib.corpus.synthesize import CorpusConfig, make_plan, make_speakers

    config = CorpusConfig.from_yaml(RECIPE / "conf/corpus.yaml", seed=1234)
    speakers = make_speakers(config)
    heldout = [s for s in speakers if s.heldout]
    seed_corpus = CorpusConfig.from_yaml(RECIPE.parent / "librispeech_fl/conf/corpus.yaml")
    assert len(heldout) >= 12 and len({s.description() for s in heldout}) == len(heldout)
    for s in heldout:  # a base the seed trained on comes back outside the seed's pitch range
        assert s.base not in seed_corpus.train_voices or abs(s.pitch) >= seed_corpus.heldout_pitch_range[0]
    plan = make_plan(config, speakers)
    texts = [u.text for u in plan if u.subset == "test-other"]
    assert len(texts) == len(set(texts)) == 60 * len(heldout)
    assert {partition_of(t, seed_corpus.eval_fraction) for t in texts} == {"test"}  # never in the seed's training
    sessions = split_sessions(_session_cuts_from_plan(plan, tmp_path), tmp_path / "sessions", 0.6,
                              dev_fraction=0.1, seed=1234)
    rows = [json.loads(line) for line in sessions.read_text().splitlines()]
    assert len(rows) == len(heldout)
    assert {(r["num_adapt"], r["num_dev"], r["num_test"], r["num_dropped"]) for r in rows} == {(36, 6, 18, 0)}
    assert_clean(sessions)


def test_embedded_sessions_split_cleanly_and_lose_nothing(tmp_path):
    """The smoke test's sessions, synthesized and read as run.sh does (stages 0-2)."""
    from fl_lib.corpus.synthesize import CorpusConfig, synthesize_corpus
    from fl_lib.data.manifests import prepare_manifests

    config = CorpusConfig.from_yaml(RECIPE / "conf/corpus_tiny.yaml", seed=1234)
    synthesize_corpus(tmp_path / "LibriSpeech", config, nj=2)
    cuts = prepare_manifests(tmp_path / "LibriSpeech", tmp_path / "manifests", nj=1)["test-other"]
    sessions = split_sessions(cuts, tmp_path / "sessions", 0.6, dev_fraction=0.1, seed=1234, min_duration=0.5,
                              max_duration=20.0)
    rows = [json.loads(line) for line in sessions.read_text().splitlines()]
    assert len(rows) == 3 and all(r["num_dropped"] == 0 and r["num_dev"] and r["num_test"] for r in rows)
    assert sum(r["num_adapt"] + r["num_dev"] + r["num_test"] for r in rows) == 15
    assert (tmp_path / "sessions/dropped.txt").read_text() == ""
    assert_clean(sessions)


def _librispeech_utt(root: Path, utt_id: str, text: str) -> None:
    """test-other/SPK/CHAP/SPK-CHAP-NNNN.flac (a tone of 0.6 s) and its transcript line."""
    import numpy as np
    import soundfile as sf

    spk, chap, _ = utt_id.split("-")
    d = root / "test-other" / spk / chap
    d.mkdir(parents=True, exist_ok=True)
    sf.write(d / f"{utt_id}.flac", 0.1 * np.sin(2 * np.pi * 220 * np.arange(9600) / 16000), 16000)
    with open(d / f"{spk}-{chap}.trans.txt", "a", encoding="utf-8") as f:
        f.write(f"{utt_id} {text}\n")


def test_corpus_dir_with_repeated_sentences_is_split_cleanly_and_every_drop_is_counted(tmp_path):
    """A LibriSpeech-layout corpus whose sessions repeat sentences, within and across sessions."""
    from fl_lib.adapt.results import make_session_results
    from fl_lib.asr.scoring import ErrorStats
    from fl_lib.data.manifests import prepare_manifests

    pool = ["THE CAT SAT", "A DOG RAN HOME", "IT WAS COLD", "WE WENT OUT", "SHE SAID NO", "THEY CAME BACK"]
    root = tmp_path / "LibriSpeech"
    for k, spk in enumerate(("3001", "3002")):
        for i in range(12):  # every sentence twice per session, shared with the other session
            _librispeech_utt(root, f"{spk}-{11 + i // 6}-{i:04d}", pool[(i + k) % len(pool)])
        for i in range(12, 16):  # and sentences of its own
            _librispeech_utt(root, f"{spk}-12-{i:04d}", f"OWN WORDS OF {spk} NUMBER {i}")
    for i in range(6):  # a session that says one thing: nothing of it can be scored
        _librispeech_utt(root, f"3003-13-{i:04d}", "ALWAYS THE SAME")
    for i in range(20):  # a session that says each of its own sentences twice
        _librispeech_utt(root, f"3004-14-{i:04d}", f"TWICE SAID NUMBER {i // 2}")
    cuts = prepare_manifests(root, tmp_path / "manifests", nj=1)["test-other"]
    pairs_left = 0  # sentences of 3004 said twice outside its adaptation part: dev and test must not split them
    for seed in range(4):
        out = tmp_path / f"sessions{seed}"
        sessions = split_sessions(cuts, out, 0.5, dev_fraction=0.2, seed=seed)
        assert_clean(sessions)
        rows = {r["id"]: r for r in map(json.loads, sessions.read_text().splitlines())}
        assert set(rows) == {"3001", "3002", "3003", "3004"}
        left = _part_sentences(sessions)["3004"]
        pairs_left += sum((left["dev"] + left["test"]).count(t) == 2 for t in set(left["dev"] + left["test"]))
        dropped = set(out.joinpath("dropped.txt").read_text().split())
        assert sum(r["num_dropped"] for r in rows.values()) == len(dropped) > 0
        adapted = {t for p in _part_sentences(sessions).values() for t in p["adapt"]}
        all_cuts = _read(cuts)
        for s in load_sessions(sessions):  # nothing lost silently, nothing dropped that was clean
            ids = {c["id"] for c in all_cuts if c["supervisions"][0]["speaker"] == s.id}
            parts = [{c["id"] for c in _read(m)} for m in (s.adapt, s.dev, s.test)]
            mine = ids & dropped
            assert set().union(*parts) | mine == ids and sum(map(len, parts)) + len(mine) == len(ids)
            assert all(c["supervisions"][0]["text"] in adapted for c in all_cuts if c["id"] in mine)
        assert (rows["3003"]["num_adapt"], rows["3003"]["num_dev"], rows["3003"]["num_test"]) == (3, 0, 0)
    assert pairs_left > 0

    # A session with nothing left to test still adapts; stage 8 lists it as not scored.
    per = {spk: ErrorStats(snt=2, wrd=10, corr=10 - e, sub=e).to_dict()
           for spk, e in (("3001", 5), ("3002", 2), ("3004", 0))}
    (tmp_path / "seed.json").write_text(json.dumps({"per_speaker_wer": per}))
    (tmp_path / "adapted.json").write_text(json.dumps({"per_speaker_wer": per}))
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "adapt_config.json").write_text(json.dumps(AdaptConfig(labels="oracle").to_dict()))
    text = make_session_results(tmp_path / "sessions0/sessions.jsonl",
                                {"d": (tmp_path / "seed.json", tmp_path / "adapted.json")}, exp).read_text()
    assert "|3003|3|0|n/a|n/a|n/a|" in text and "|**pooled words**|||23.3|23.3|**0.0**|" in text


def test_sessions_from_before_dev_parts_are_refused_with_what_to_run(tmp_path):
    (tmp_path / "sessions.jsonl").write_text(json.dumps({"id": "1", "adapt": "adapt/1.jsonl.gz", "test": "t",
                                                         "num_adapt": 1, "num_test": 1}) + "\n")
    with pytest.raises(ValueError, match="no dev part .* run stage 2"):
        load_sessions(tmp_path / "sessions.jsonl")


# Reporting that cannot lie: the confidence method is the table's, checked at every step.

def _beam_table(tmp_path: Path, sessions: Path, method: str = "beam_score") -> tuple[Path, Path]:
    """hyps.jsonl of every adaptation cut and a confidence table made by `method`."""
    from fl_lib.confidence.tables import confidence_row, write_jsonl

    hyps = [{"utt_id": c["id"], "session": s.id, "text": f"HYP {c['id']}", "token_int": [1, 2],
             "score": -0.1 * i} for s in load_sessions(sessions) for i, c in enumerate(_read(s.adapt))]
    write_jsonl(tmp_path / "hyps.jsonl", hyps)
    write_jsonl(tmp_path / "confidence.jsonl", [confidence_row(h["utt_id"], method, h["score"], 2) for h in hyps])
    return tmp_path / "hyps.jsonl", tmp_path / "confidence.jsonl"


def test_the_filter_refuses_a_table_made_by_another_method(tmp_path):
    from fl_lib.confidence.tables import read_jsonl, write_jsonl

    sessions = split_sessions(_corpus(tmp_path), tmp_path / "sessions", 0.7, seed=0)
    hyps, table = _beam_table(tmp_path, sessions)
    k2 = AdaptConfig(confidence="k2", filter="top_fraction", top_fraction=0.5)
    with pytest.raises(ValueError, match="made by beam_score but the adaptation config says confidence: k2; "
                                         "k2 was missing when stage 5 ran"):
        select_labels(sessions, k2, tmp_path / "k2", hyps, table)
    assert not (tmp_path / "k2/clients.jsonl").exists()
    beam = AdaptConfig(confidence="beam_score", filter="top_fraction", top_fraction=0.5)
    select_labels(sessions, beam, tmp_path / "beam", hyps, table)
    selection = json.loads((tmp_path / "beam/selection.json").read_text())
    assert selection["confidence_method"] == "beam_score" and selection["confidence"] == str(table.resolve())
    rows = read_jsonl(table)
    rows[0]["method"] = "k2"
    write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(ValueError, match="made by beam_score and k2: a confidence table has one method"):
        select_labels(sessions, beam, tmp_path / "mixed", hyps, tmp_path / "mixed.jsonl")


def test_installing_k2_after_a_fallback_run_makes_stage_5_run_again(tmp_path, caplog):
    """The done-marker records whether k2 was there: a fallback table is not reused once it is."""
    import sys

    from fl_lib.bin.confidence import compute_confidence
    from fl_lib.confidence.tables import table_method

    sessions = split_sessions(_corpus(tmp_path), tmp_path / "sessions", 0.7, seed=0)
    hyps, _ = _beam_table(tmp_path, sessions)
    out = tmp_path / "gen1/confidence.jsonl"
    out.parent.mkdir()
    k2_python = tmp_path / "venv-k2/bin/python"
    with caplog.at_level(logging.INFO):
        assert compute_confidence("k2", hyps, tmp_path / "logp.scp", out, str(k2_python)) == "beam_score"
        assert "FALLING BACK" in caplog.text and table_method(out) == "beam_score"
        caplog.clear()
        assert compute_confidence("k2", hyps, tmp_path / "logp.scp", out, str(k2_python)) == "beam_score"
        assert "already computed with beam_score" in caplog.text

    # "Install" k2: an interpreter that runs what stage 5 asks of fl_lib.confidence.lattice, and counts its calls.
    calls = tmp_path / "calls"
    k2_python.parent.mkdir(parents=True)
    k2_python.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "from fl_lib.confidence.tables import confidence_row, read_jsonl, write_jsonl\n"
        "assert sys.argv[1:3] == ['-m', 'fl_lib.confidence.lattice'], sys.argv\n"
        "opts = dict(zip(sys.argv[3::2], sys.argv[4::2]))\n"
        f"open({str(calls)!r}, 'a').write('lattice\\n')\n"
        "write_jsonl(opts['--output'], [confidence_row(h['utt_id'], 'k2', h['score'] - 1.0, len(h['token_int']))\n"
        "                               for h in read_jsonl(opts['--hyps'])])\n")
    k2_python.chmod(0o755)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert compute_confidence("k2", hyps, tmp_path / "logp.scp", out, str(k2_python)) == "k2"
    assert "already computed" not in caplog.text and "FALLING BACK" not in caplog.text
    assert table_method(out) == "k2" and calls.read_text() == "lattice\n"
    assert compute_confidence("k2", hyps, tmp_path / "logp.scp", out, str(k2_python)) == "k2"
    assert calls.read_text() == "lattice\n"  # and now it is reused
    marker = out.with_name(out.name + ".done")
    stamp = json.loads(marker.read_text())
    marker.write_text(json.dumps({k: v for k, v in stamp.items() if k != "rows"}))  # a table of the older row format
    assert compute_confidence("k2", hyps, tmp_path / "logp.scp", out, str(k2_python)) == "k2"
    assert calls.read_text() == "lattice\nlattice\n"  # made again, with token posteriors
    k2 = AdaptConfig(confidence="k2", filter="top_fraction", top_fraction=0.5)
    select_labels(sessions, k2, tmp_path / "gen1/clients", hyps, out)  # the k2 config takes the k2 table


def test_results_name_the_method_read_from_the_table_not_from_the_config(tmp_path):
    from fl_lib.adapt.results import make_session_results, render_ablation
    from fl_lib.asr.scoring import ErrorStats
    from fl_lib.confidence.tables import read_jsonl, write_jsonl

    sessions = split_sessions(_corpus(tmp_path), tmp_path / "sessions", 0.7, seed=0)
    exp = tmp_path / "exp"
    (exp / "gen1").mkdir(parents=True)
    hyps, table = _beam_table(exp / "gen1", sessions)
    beam = AdaptConfig(confidence="beam_score", filter="top_fraction", top_fraction=0.5)
    select_labels(sessions, beam, exp / "gen1/clients", hyps, table)
    # The config a run saved says k2; the table that filtered its labels says beam_score.
    (exp / "adapt_config.json").write_text(json.dumps({**beam.to_dict(), "confidence": "k2"}))
    per = {spk: ErrorStats(snt=2, wrd=10, corr=8, sub=2).to_dict() for spk in ("2001", "2002")}
    (tmp_path / "score.json").write_text(json.dumps({"per_speaker_wer": per}))
    text = make_session_results(sessions, {"d": (tmp_path / "score.json", tmp_path / "score.json")}, exp).read_text()
    assert "## exp: beam_score confidence, top 50%" in text
    assert "confidence that ran (read from the confidence tables): beam_score" in text
    assert "|1|beam_score|14|" in text
    assert "|exp|beam_score confidence, top 50%|" in render_ablation([exp])
    rows = read_jsonl(table)  # the table made again by another method, the labels not filtered again
    write_jsonl(table, [{**r, "method": "k2"} for r in rows])
    with pytest.raises(ValueError, match="now says k2, but the labels .* were filtered by a beam_score table"):
        make_session_results(sessions, {"d": (tmp_path / "score.json", tmp_path / "score.json")}, exp)


def test_dev_comparison_of_filters_reads_kept_dropped_and_disagreeing_labels(tmp_path):
    """Two sessions of four dev labels; method a ranks the right labels first, method b the wrong ones."""
    from fl_lib.adapt.confidence_dev import Variant, compare, render
    from fl_lib.confidence.tables import confidence_row, write_jsonl

    truth = {f"s{s}-{i}": "TURN ON THE LIGHTS" for s in (1, 2) for i in range(4)}
    right = {"s1-0", "s1-1", "s2-0", "s2-1"}
    hyps = [{"utt_id": u, "session": u[:2], "text": t if u in right else "TURN OFF THE RADIO"}
            for u, t in truth.items()]
    write_jsonl(tmp_path / "hyps.jsonl", hyps)
    variants = []
    for name, method, good_first in (("a", "k2_lm", True), ("b", "beam_score", False)):
        write_jsonl(tmp_path / f"{name}.jsonl", [confidence_row(h["utt_id"], method,
                                                                -1.0 if (h["utt_id"] in right) == good_first else -5.0, 4)
                                                 for h in hyps])
        extra = {"ngram_order": 2, "lm_weight": 1.0} if method == "k2_lm" else {}
        conf = AdaptConfig(confidence=method, filter="top_fraction", top_fraction=0.5, **extra)
        variants.append(Variant(name, conf, tmp_path / f"{name}.jsonl"))
    result = compare(tmp_path / "hyps.jsonl", truth, variants)
    assert result["all"] == {"utts": 8, "words": 32, "wer": 25.0}  # 4 wrong labels, 2 of 4 words wrong each
    a, b = result["variants"]
    assert a["kept"] == {"utts": 4, "words": 16, "wer": 0.0} and a["dropped"]["wer"] == 50.0
    assert b["kept"]["wer"] == 50.0 and b["dropped"]["wer"] == 0.0
    (pair,) = result["disagreements"]
    assert pair["only_a"]["wer"] == 0.0 and pair["only_b"]["wer"] == 50.0 and pair["only_a"]["utts"] == 4
    assert "| a | k2_lm | utterance | 4 | 0.0 | 4 | 50.0 |" in render(result)
    with pytest.raises(ValueError, match="without a dev transcript"):
        compare(tmp_path / "hyps.jsonl", {u: t for u, t in truth.items() if u != "s1-0"}, variants)


def test_wiseft_interpolation_is_the_weighted_mean_and_refuses_models_of_another_shape(tmp_path):
    import torch

    from fl_lib.adapt.interpolate import interpolate_state_dicts, write_interpolations
    from fl_lib.bin.interpolate_seed import main as interpolate_main

    seed = {"w": torch.tensor([1.0, 2.0, -4.0]), "n": torch.tensor(3)}
    adapted = {"w": torch.tensor([3.0, 2.0, 0.0]), "n": torch.tensor(7)}
    quarter = interpolate_state_dicts(seed, adapted, 0.25)
    assert torch.equal(quarter["w"], torch.tensor([1.5, 2.0, -3.0]))  # 0.75 * seed + 0.25 * adapted, by hand
    assert quarter["n"].item() == 7 and quarter["w"].dtype == torch.float32  # a counter is not interpolated
    assert torch.equal(interpolate_state_dicts(seed, adapted, 0.0)["w"], seed["w"])
    assert torch.equal(interpolate_state_dicts(seed, adapted, 1.0)["w"], adapted["w"])
    for bad, message in (({"w": torch.zeros(3)}, "different parameters"),
                         ({"w": torch.zeros(4), "n": torch.tensor(7)}, "shape")):
        with pytest.raises(ValueError, match=message):
            interpolate_state_dicts(seed, bad, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interpolate_state_dicts(seed, adapted, 1.5)

    torch.save(seed, tmp_path / "seed.pth")
    torch.save(adapted, tmp_path / "valid.acc.best.pth")
    names = write_interpolations(tmp_path, "best", tmp_path / "seed.pth", [0.5, 0.25])
    assert names == ["wiseft0.5_valid.acc.best.pth", "wiseft0.25_valid.acc.best.pth"]
    assert torch.equal(torch.load(tmp_path / names[1])["w"], quarter["w"])
    with pytest.raises(ValueError, match="twice"):
        write_interpolations(tmp_path, "best", tmp_path / "seed.pth", [0.5, 0.5])
    torch.save({"w": torch.zeros(3)}, tmp_path / "other.pth")
    assert interpolate_main(["--exp_dir", str(tmp_path), "--model", "other.pth",
                             "--seed_model", str(tmp_path / "seed.pth"), "--alphas", "0.5"]) == 1


def test_the_filter_ranks_by_the_weakest_token_and_refuses_a_table_without_token_posteriors(tmp_path):
    """rank_by: weakest_token keeps the utterances whose least confident token is the most confident,
    which the utterance posterior may rank the other way; a table without token posteriors is refused."""
    from fl_lib.confidence.tables import confidence_row, read_jsonl, write_jsonl

    sessions = split_sessions(_corpus(tmp_path), tmp_path / "sessions", 0.7, seed=0)
    hyps, beam_table = _beam_table(tmp_path, sessions)
    rows = read_jsonl(hyps)
    # the utterance posterior prefers the first utterances of each session; their weakest token the last ones
    n = {}
    table = []
    for h in rows:
        i = n[h["session"]] = n.get(h["session"], -1) + 1
        table.append(confidence_row(h["utt_id"], "k2", -0.1 * i, 2, [0.99, 0.1 + 0.1 * i]))
    write_jsonl(tmp_path / "k2.jsonl", table)
    picked = {}
    for rank_by in ("utterance", "weakest_token"):
        conf = AdaptConfig(confidence="k2", filter="top_fraction", top_fraction=0.5, rank_by=rank_by)
        select_labels(sessions, conf, tmp_path / rank_by, hyps, tmp_path / "k2.jsonl")
        picked[rank_by] = json.loads((tmp_path / rank_by / "selection.json").read_text())["sessions"]
    for sid, sel in picked["utterance"].items():
        ids = sorted((h["utt_id"] for h in rows if h["session"] == sid), key=lambda u: [r["utt_id"] for r in rows].index(u))
        half = -(-len(ids) // 2)
        assert sel["kept_ids"] == sorted(ids[:half]) and picked["weakest_token"][sid]["kept_ids"] == sorted(ids[-half:])
    beam_as_k2 = [{**r, "method": "k2"} for r in read_jsonl(beam_table)]  # a k2 table of the old format
    write_jsonl(tmp_path / "old.jsonl", beam_as_k2)
    weakest = AdaptConfig(confidence="k2", filter="top_fraction", top_fraction=0.5, rank_by="weakest_token")
    with pytest.raises(ValueError, match="has no token posteriors, which rank_by: weakest_token needs"):
        select_labels(sessions, weakest, tmp_path / "old", hyps, tmp_path / "old.jsonl")
