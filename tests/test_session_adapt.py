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
        test = {c["id"] for c in _read(s.test)}
        assert len(adapt) == 7 and len(test) == 3 and not adapt & test
        assert adapt | test == {f"{s.id}-1-{i:04d}" for i in range(10)}
        assert adapt == {c["id"] for c in _read(s_again.adapt)}
        assert all("text" in c["supervisions"][0] for c in _read(s.test))
    assert any({c["id"] for c in _read(a.adapt)} != {c["id"] for c in _read(b.adapt)} for a, b in zip(first, other))
    test_all = _read(tmp_path / "s1/test.jsonl.gz")
    assert len(test_all) == 6


def test_session_without_usable_utterances_is_skipped_and_logged(tmp_path, caplog):
    cuts = [_cut(f"2001-1-{i:04d}", "2001", "A B") for i in range(4)]
    cuts += [_cut(f"2002-1-{i:04d}", "2002", "A B", duration=30.0) for i in range(4)]  # all too long
    cuts += [_cut("2003-1-0000", "2003", "A B")]  # one utterance: nothing left to test on
    with caplog.at_level(logging.WARNING):
        sessions = load_sessions(split_sessions(_write(tmp_path / "c.jsonl.gz", cuts), tmp_path / "out",
                                                max_duration=20.0))
    assert [s.id for s in sessions] == ["2001"]
    assert "session 2002 skipped: 0 usable utterance(s) (4 outside" in caplog.text
    assert "session 2003 skipped: 1 usable utterance(s)" in caplog.text


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
])
def test_adapt_config_rejects_options_that_do_nothing_or_make_no_sense(conf):
    with pytest.raises(ValueError):
        AdaptConfig.from_yaml(None, [f"{k}={v}" for k, v in conf.items()])


def test_adapt_config_files_of_the_recipe_load():
    for path in sorted((Path(__file__).resolve().parents[1] / "egs/session_adapt/conf").glob("adapt*.yaml")):
        AdaptConfig.from_yaml(path)


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
    """WERR = (seed - adapted) / seed per session; the mean is over sessions; the table lists each session."""
    from fl_lib.adapt.results import make_session_results, render_ablation, werr
    from fl_lib.asr.scoring import ErrorStats

    assert werr(50.0, 40.0) == pytest.approx(20.0)
    assert werr(0.0, 10.0) is None
    sessions = split_sessions(_corpus(tmp_path), tmp_path / "sessions", 0.7, seed=0)

    def score_json(path, errors):
        per = {spk: ErrorStats(snt=3, wrd=100, corr=100 - e, sub=e).to_dict() for spk, e in errors.items()}
        path.write_text(json.dumps({"per_speaker_wer": per}))
        return path

    seed = score_json(tmp_path / "seed.json", {"2001": 50, "2002": 20})
    adapted = score_json(tmp_path / "adapted.json", {"2001": 40, "2002": 22})
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "adapt_config.json").write_text(json.dumps(AdaptConfig(labels="oracle").to_dict()))
    text = make_session_results(sessions, seed, adapted, exp, wall_seconds=90).read_text()
    assert "|2001|7|3|50.0|40.0|20.0|" in text and "|2002|7|3|20.0|22.0|-10.0|" in text
    assert "|**mean over sessions**|||35.0|31.0|**5.0**|" in text
    assert "|pooled words|||35.0|31.0|11.4|" in text
    table = render_ablation([exp])
    assert "|exp|oracle transcripts|n/a|all|0.0 (truth)|35.0|31.0|5.0|11.4|1.5|" in table
    make_session_results(sessions, seed, adapted, exp, student_config="conf/student_specaug.yaml")
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
