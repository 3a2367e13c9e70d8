"""Pseudo-labels from a real (tiny) ESPnet model on flite speech: k2 confidence, filtering, seed checks.

The tiny model is overfitted on four utterances (conftest's tiny_exp);
each session also holds sentences it never heard. Its labels of the heard ones
are right and those of the others mostly wrong: a confidence worth its name keeps
the right ones, so the kept labels are more accurate than all of them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import UTTS, flite_cuts

from fl_lib.adapt.config import AdaptConfig
from fl_lib.adapt.results import label_wer
from fl_lib.adapt.select import select_labels
from fl_lib.adapt.sessions import split_sessions

REPO = Path(__file__).resolve().parents[1]
K2_PYTHON = REPO / ".venv-k2/bin/python"
UNSEEN = {"slt": ["CLOSE THE RADIO", "TURN ON THE DOOR", "OPEN THE LIGHTS"],
          "rms": ["TURN OFF THE LIGHTS", "OPEN THE RADIO", "CLOSE THE LIGHTS"]}


def _session_cuts(tmp: Path) -> Path:
    """Each speaker's heard and unheard sentences, one session per speaker."""
    utts = {spk: (voice, heard + UNSEEN[spk]) for spk, (voice, heard) in UTTS.items()}
    return flite_cuts(tmp, utts, "sessions_cuts.jsonl.gz")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_exp):
    """(gen dir, sessions.jsonl, truth) after stage 4 (pseudo-labels) with the overfitted model."""
    from fl_lib.adapt.pseudo import pseudo_label

    tmp = tmp_path_factory.mktemp("pseudo")
    exp, _ = tiny_exp  # overfitted on UTTS: the sessions' heard sentences, same voices
    sessions = split_sessions(_session_cuts(tmp), tmp / "sessions", adapt_fraction=0.6, seed=0)
    decode = tmp / "decode.yaml"
    decode.write_text(yaml.safe_dump({"beam_size": 4, "ctc_weight": 1.0, "lm_weight": 0.0, "nbest": 1}))
    gen = tmp / "gen1"
    pseudo_label(sessions, exp, "valid.acc.best.pth", decode, gen / "labels", nj=1)
    return gen, sessions, tmp / "sessions/truth/adapt_text"


def test_pseudo_labels_carry_hypotheses_beam_scores_and_ctc_posteriors(labelled):
    import kaldiio

    gen, _, truth = labelled
    rows = [json.loads(line) for line in (gen / "labels/hyps.jsonl").read_text().splitlines()]
    assert len(rows) == len(truth.read_text().splitlines()) == 6  # 3 of 5 utterances of 2 sessions
    mats = kaldiio.load_scp(str(gen / "labels/logp.scp"))
    for row in rows:
        logp = torch.from_numpy(mats[row["utt_id"]])
        assert logp.shape[0] == row["num_frames"]
        assert torch.allclose(logp.exp().sum(-1), torch.ones(logp.shape[0]), atol=1e-4)  # a log-softmax
        assert row["score"] < 0 and row["session"] in UTTS


def _grammar(tmp_path: Path, tiny_exp, order: int = 3, lm_weight: float = 0.5):
    """k2_lm's n-gram spec: LM text of commands in the tiny model's alphabet, none of them a session's."""
    from fl_lib.confidence.grammar import GrammarSpec

    exp, _ = tiny_exp
    text = tmp_path / "lm.txt"
    text.write_text("TURN ON THE RADIO\nCLOSE THE RADIO DOOR\nOPEN THE LIGHTS ON THE DOOR\nTURN OFF THE DOOR\n")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("\n".join(yaml.safe_load((exp / "config.yaml").read_text())["token_list"]) + "\n")
    return GrammarSpec(text, tokens, None, order, lm_weight)


@pytest.mark.parametrize("method", ["k2", "k2_lm", "beam_score"])
def test_filtering_keeps_more_accurate_labels_than_all(labelled, method, tmp_path, tiny_exp):
    from fl_lib.adapt.select import read_text_table
    from fl_lib.bin.confidence import compute_confidence

    gen, sessions, truth = labelled
    work = tmp_path / "gen1"
    (work / "labels").mkdir(parents=True)
    for name in ("hyps.jsonl", "logp.scp", "logp.ark"):
        (work / "labels" / name).symlink_to(gen / "labels" / name)
    grammar = _grammar(tmp_path, tiny_exp) if method == "k2_lm" else None
    used = compute_confidence(method, work / "labels/hyps.jsonl", work / "labels/logp.scp",
                              work / "labels/confidence.jsonl", str(K2_PYTHON), grammar)
    assert used == method
    extra = {"ngram_order": 3, "lm_weight": 0.5} if method == "k2_lm" else {}
    conf = AdaptConfig(confidence=method, filter="top_fraction", top_fraction=0.5, **extra)
    select_labels(sessions, conf, work / "clients", work / "labels/hyps.jsonl", work / "labels/confidence.jsonl")
    scores = label_wer(work, read_text_table(truth))
    wer_all, wer_kept = scores["all"]["percent"]["Err"], scores["kept"]["percent"]["Err"]
    assert scores["num_kept"] < scores["num_all"]
    assert wer_kept < wer_all, (wer_kept, wer_all)


def test_k2_confidence_falls_back_to_the_beam_score_loudly(labelled, tmp_path, caplog):
    from fl_lib.bin.confidence import compute_confidence

    gen, _, _ = labelled
    out = tmp_path / "confidence.jsonl"
    used = compute_confidence("k2", gen / "labels/hyps.jsonl", gen / "labels/logp.scp", out,
                              str(tmp_path / "no-venv-k2/bin/python"))
    assert used == "beam_score"
    assert "FALLING BACK to ESPnet's length-normalized beam score" in caplog.text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["method"] for r in rows} == {"beam_score"}


def test_k2_posterior_agrees_with_the_ctc_prefix_beam_score(labelled, tmp_path):
    """With a CTC-only model, ESPnet's final beam score is log P(hyp | audio) too: the two must agree."""
    from fl_lib.bin.confidence import compute_confidence

    gen, _, _ = labelled
    compute_confidence("k2", gen / "labels/hyps.jsonl", gen / "labels/logp.scp", tmp_path / "k2.jsonl",
                       str(K2_PYTHON))
    k2_rows = {r["utt_id"]: r for r in map(json.loads, (tmp_path / "k2.jsonl").read_text().splitlines())}
    for row in map(json.loads, (gen / "labels/hyps.jsonl").read_text().splitlines()):
        assert k2_rows[row["utt_id"]]["log_posterior"] == pytest.approx(row["score"], abs=1e-2)


def test_lm_confidence_is_not_the_beam_score_and_follows_the_lm_text(labelled, tmp_path, tiny_exp):
    """Unlike k2 (test above), k2_lm leaves the CTC beam score; an LM text that reads the hypothesis
    raises its confidence. The grammar's n-gram is rebuilt, and the table recomputed, when the text changes."""
    from fl_lib.bin.confidence import compute_confidence

    gen, _, _ = labelled
    hyps = {r["utt_id"]: r for r in map(json.loads, (gen / "labels/hyps.jsonl").read_text().splitlines())}
    grammar = _grammar(tmp_path, tiny_exp)
    out = tmp_path / "k2_lm.jsonl"
    compute_confidence("k2_lm", gen / "labels/hyps.jsonl", gen / "labels/logp.scp", out, str(K2_PYTHON), grammar)
    before = {r["utt_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert max(abs(before[u]["log_posterior"] - h["score"]) for u, h in hyps.items()) > 0.1
    assert (tmp_path / "k2_lm.G.txt").is_file()
    # The text plus one hypothesis, many times over: that hypothesis gains confidence, each in turn.
    # (Reading all of them at once also raises their rivals: a fresh clone's CI saw "TURN OFF THE DIO"
    # fall once "TURN OFF THE RADIO" was read too, so each is read alone.)
    text = grammar.lm_text.read_text()
    read = [(utt, hyp) for utt, hyp in hyps.items() if hyp["text"]]
    assert read, "no hypothesis to read: the test would check nothing"
    for utt, hyp in read:
        grammar.lm_text.write_text(text + (hyp["text"] + "\n") * 20)
        compute_confidence("k2_lm", gen / "labels/hyps.jsonl", gen / "labels/logp.scp", out, str(K2_PYTHON),
                           grammar)
        after = {r["utt_id"]: r for r in map(json.loads, out.read_text().splitlines())}
        assert after[utt]["log_posterior"] > before[utt]["log_posterior"], (hyp["text"], before[utt], after[utt])


def test_confidence_cli_refuses_grammar_options_that_do_nothing(labelled, tmp_path):
    from fl_lib.bin.confidence import main

    gen, _, _ = labelled
    args = ["--hyps", str(gen / "labels/hyps.jsonl"), "--logp_scp", str(gen / "labels/logp.scp"),
            "--output", str(tmp_path / "c.jsonl")]
    with pytest.raises(SystemExit):
        main(["--method", "k2", *args, "--ngram_order", "3"])
    with pytest.raises(SystemExit):
        main(["--method", "k2_lm", *args, "--ngram_order", "3"])  # no --lm_text, --token_list, --lm_weight
    assert not (tmp_path / "c.jsonl").exists()


def test_seed_without_experiment_or_with_another_token_list_fails_before_decoding(labelled, tmp_path,
                                                                                   tiny_tokens):
    """import_seed (stage 3) says what to run, or names the mismatch; no decoding starts."""
    from fl_lib.adapt.seed import SeedError, import_seed

    with pytest.raises(SeedError, match="librispeech_fl"):
        import_seed(None, "valid.acc.best.pth", tmp_path / "a")
    with pytest.raises(SeedError, match="config.yaml missing"):
        import_seed(tmp_path / "nowhere", "valid.acc.best.pth", tmp_path / "b")
    bpemodel, token_list = tiny_tokens
    seed = tmp_path / "seed"
    seed.mkdir()
    tokens = token_list.read_text().split()
    (seed / "asr_config.yaml").write_text("encoder: rnn\n")
    state = {"ctc.ctc_lo.weight": torch.zeros(len(tokens) + 3, 4)}
    torch.save(state, seed / "valid.acc.best.pth")
    (seed / "config.yaml").write_text(yaml.safe_dump({"token_list": tokens, "bpemodel": str(bpemodel)}))
    with pytest.raises(SeedError, match=f"{len(tokens) + 3} outputs but its token list has {len(tokens)}"):
        import_seed(seed, "valid.acc.best.pth", tmp_path / "c")
    short = [t for t in tokens if t not in ("A", "E")]
    torch.save({"ctc.ctc_lo.weight": torch.zeros(len(short), 4)}, seed / "valid.acc.best.pth")
    (seed / "config.yaml").write_text(yaml.safe_dump({"token_list": short, "bpemodel": str(bpemodel)}))
    with pytest.raises(SeedError, match="another token list"):
        import_seed(seed, "valid.acc.best.pth", tmp_path / "d")
    assert not (tmp_path / "d/model.pth").exists()


def test_seed_lm_of_another_token_list_or_unfinished_is_refused(tmp_path, tiny_tokens):
    """import_lm (stage 3 with --use_lm true) copies only an LM that speaks the seed's tokens."""
    from fl_lib.adapt.seed import SeedError, import_lm

    bpemodel, token_list = tiny_tokens
    seed = tmp_path / "seed"
    seed.mkdir()
    tokens = token_list.read_text().split()
    (seed / "tokens.txt").write_text("\n".join(tokens) + "\n")
    torch.save({}, seed / "model.pth")
    lm = tmp_path / "lm_exp"
    lm.mkdir()
    with pytest.raises(SeedError, match="config.yaml missing"):
        import_lm(lm, seed)
    text = tmp_path / "lm.txt"
    text.write_text("TURN ON THE LIGHTS\n")
    (lm / "inputs.json").write_text(json.dumps({"text": {"path": str(text)}}))
    torch.save({"lm.embed.weight": torch.zeros(len(tokens), 4)}, lm / "valid.loss.best.pth")
    (lm / "config.yaml").write_text(yaml.safe_dump({"token_list": tokens[:-1], "bpemodel": str(bpemodel)}))
    with pytest.raises(SeedError, match="another token list"):
        import_lm(lm, seed)
    assert not (seed / "lm").exists()
    (lm / "config.yaml").write_text(yaml.safe_dump({"token_list": tokens, "bpemodel": "elsewhere/bpe.model"}))
    out = import_lm(lm, seed)
    assert yaml.safe_load((out / "config.yaml").read_text())["bpemodel"] == str((seed / "bpe.model").resolve())
    assert (out / "text.txt").read_text() == "TURN ON THE LIGHTS\n"
    text.unlink()
    with pytest.raises(SeedError, match="which is gone"):
        import_lm(lm, seed)
