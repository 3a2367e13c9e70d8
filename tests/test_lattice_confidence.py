"""fl_lib.confidence.lattice: the k2 utterance posterior of a CTC hypothesis, checked by brute force.

The k2 code runs in .venv-k2 (its own python), as the recipe runs it; matrices
go there as Kaldi ark/scp, written here with kaldiio.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
from pathlib import Path

import kaldiio
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
K2_PYTHON = ROOT / ".venv-k2/bin/python"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def collapse(frames) -> tuple:
    """CTC's many-to-one map: merge repeats, then drop blanks (0)."""
    return tuple(s for s, _ in itertools.groupby(frames) if s != 0)


def brute_force_log_posterior(scores: np.ndarray, hyp, lm=None, lm_weight: float = 0.0) -> float:
    """log of (sum over frame paths collapsing to hyp) / (sum over all frame paths), by enumeration;
    with `lm`, every path also weighs P_lm(its label sequence) ** lm_weight."""
    T, V = scores.shape
    num, den = 0.0, 0.0
    for path in itertools.product(range(V), repeat=T):
        labels = collapse(path)
        log_p = sum(scores[t, s] for t, s in enumerate(path))
        if lm is not None:
            log_p += lm_weight * lm.sentence_logprob(labels)
        den += math.exp(log_p)
        if labels == tuple(hyp):
            num += math.exp(log_p)
    return math.log(num / den)


def brute_force_token_posteriors(scores: np.ndarray, hyp, lm=None, lm_weight: float = 0.0, window: int = 2) -> list:
    """Each hypothesis token's expected number of emissions (first frames of a run of that label)
    in its frames, capped at 1, by enumeration of every frame path. A token's frames are those
    within `window` of its emission frame in the hypothesis' best (Viterbi) alignment that are
    nearer to it than to any other token's emission frame (a tie goes to the later token)."""
    T, V = scores.shape
    paths = list(itertools.product(range(V), repeat=T))
    acoustic = [sum(scores[t, s] for t, s in enumerate(p)) for p in paths]
    emissions = [[(t, s) for t, s in enumerate(p) if s != 0 and (t == 0 or p[t - 1] != s)] for p in paths]
    best = max((a, e) for p, a, e in zip(paths, acoustic, emissions) if collapse(p) == tuple(hyp))[1]
    starts = [t for t, _ in best]
    owner = {t: min(range(len(starts)), key=lambda j: (abs(t - starts[j]), -j)) for t in range(T)} if starts else {}
    frames = [{t for t in range(T) if owner[t] == i and abs(t - starts[i]) <= window} for i in range(len(starts))]
    weights = [math.exp(a + (lm_weight * lm.sentence_logprob(collapse(p)) if lm else 0.0)) for p, a in zip(paths, acoustic)]
    z = sum(weights)
    return [min(1.0, sum(w * sum(1 for t, s in e if s == tok and t in mine) for w, e in zip(weights, emissions)) / z)
            for tok, mine in zip(hyp, frames)]


def run_k2(tmp_path: Path, mats: dict, hyps: dict, extra: tuple = ()) -> dict:
    """Run the recipe's k2 CLI on {utt: [T, V]} and {utt: token ids}; return {utt: confidence row}."""
    assert K2_PYTHON.exists(), "run `make install`: .venv-k2 is missing"
    kaldiio.save_ark(str(tmp_path / "logp.ark"), {u: m.astype(np.float32) for u, m in mats.items()},
                     scp=str(tmp_path / "logp.scp"))
    with open(tmp_path / "hyps.jsonl", "w") as f:
        for u, h in hyps.items():
            f.write(json.dumps({"utt_id": u, "token_int": list(h)}) + "\n")
    out = tmp_path / "confidence.jsonl"
    proc = subprocess.run(
        [str(K2_PYTHON), "-m", "fl_lib.confidence.lattice", "--hyps", str(tmp_path / "hyps.jsonl"),
         "--logp_scp", str(tmp_path / "logp.scp"), "--output", str(out), "--batch_size", "3", *extra],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["utt_id"]: r for r in map(json.loads, out.read_text().splitlines())}


@pytest.mark.parametrize("V,cases", [
    (3, [(4, (1, 2)), (5, (2, 2)), (4, ()), (6, (1, 2, 1)), (5, (2,))]),
    (4, [(3, (3,)), (5, (1, 3, 1)), (4, (2, 3))]),
])
def test_lattice_posterior_equals_brute_force_enumeration(tmp_path, V, cases):
    rng = np.random.default_rng(V)
    mats, hyps = {}, {}
    for n, (T, hyp) in enumerate(cases):
        scores = rng.normal(size=(T, V))
        if n % 2 == 0:  # half frame-normalized log-softmax (total 1), half raw scores (total must be computed)
            scores = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
        mats[f"u{n}"], hyps[f"u{n}"] = scores, hyp
    rows = run_k2(tmp_path, mats, hyps)
    for u in mats:
        expected = brute_force_log_posterior(mats[u].astype(np.float32).astype(np.float64), hyps[u])
        assert rows[u]["log_posterior"] == pytest.approx(expected, abs=1e-5), u
        assert rows[u]["method"] == "k2"
        assert rows[u]["num_tokens"] == len(hyps[u])
        assert rows[u]["confidence"] == pytest.approx(math.exp(expected / max(len(hyps[u]), 1)), rel=1e-5)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_lm_lattice_posterior_equals_brute_force_and_differs_from_ctc_alone(tmp_path, order):
    """k2_lm: the posterior under P_ctc * P_ngram ** 0.7, against enumeration of every frame path."""
    from fl_lib.confidence.ngram import TokenNgram

    V = 4
    lm = TokenNgram([[1, 2], [1, 2, 3], [2, 2], [1], [3, 1, 2]], order=order, vocab_size=V)
    (tmp_path / "G.txt").write_text(lm.to_k2_str())
    rng = np.random.default_rng(order)
    cases = [(4, (1, 2)), (5, (2, 2)), (3, ()), (5, (1, 2, 3)), (4, (3,))]
    mats = {f"u{n}": rng.normal(size=(T, V)) for n, (T, _) in enumerate(cases)}
    hyps = {f"u{n}": hyp for n, (_, hyp) in enumerate(cases)}
    rows = run_k2(tmp_path, mats, hyps, ("--grammar", str(tmp_path / "G.txt"), "--lm_weight", "0.7"))
    for u in mats:
        scores = mats[u].astype(np.float32).astype(np.float64)
        expected = brute_force_log_posterior(scores, hyps[u], lm, 0.7)
        assert rows[u]["log_posterior"] == pytest.approx(expected, abs=1e-5), u
        assert rows[u]["method"] == "k2_lm"
        assert abs(expected - brute_force_log_posterior(scores, hyps[u])) > 0.05, u  # the LM counts


@pytest.mark.parametrize("order", [0, 2])
def test_token_posteriors_equal_brute_force_with_and_without_the_lm(tmp_path, order):
    """token_posteriors: arc posteriors of the (LM-weighted) lattice in each token's window, by enumeration."""
    from fl_lib.confidence.ngram import TokenNgram

    V = 4
    lm = TokenNgram([[1, 2], [1, 2, 3], [2, 2], [3, 1, 2]], order=order, vocab_size=V) if order else None
    extra = ()
    if lm:
        (tmp_path / "G.txt").write_text(lm.to_k2_str())
        extra = ("--grammar", str(tmp_path / "G.txt"), "--lm_weight", "0.7")
    rng = np.random.default_rng(7 + order)
    cases = [(4, (1, 2)), (5, (2, 2)), (3, ()), (7, (1, 2, 3)), (7, (3,)), (5, (1, 3, 1)), (2, (2, 2))]
    mats = {f"u{n}": rng.normal(size=(T, V)) for n, (T, _) in enumerate(cases)}
    hyps = {f"u{n}": hyp for n, (_, hyp) in enumerate(cases)}
    rows = run_k2(tmp_path, mats, hyps, extra)
    impossible = rows.pop("u6")  # (2, 2) needs a blank between its tokens: three frames, and it has two
    assert impossible["log_posterior"] == -math.inf and impossible["token_posteriors"] == [0.0, 0.0]
    for u in rows:
        scores = mats[u].astype(np.float32).astype(np.float64)
        expected = brute_force_token_posteriors(scores, hyps[u], lm, 0.7)
        assert rows[u]["token_posteriors"] == pytest.approx(expected, abs=1e-5), u
        if lm and hyps[u]:  # the LM moves the token posteriors too
            assert max(abs(a - b) for a, b in zip(expected, brute_force_token_posteriors(scores, hyps[u]))) > 0.01, u


def test_the_token_the_frames_leave_in_doubt_is_the_weakest(tmp_path):
    """Frames 3 3 _ {1 or 2} _ 2: hypothesis 3 1 2 holds one doubtful token; its posterior is near one
    half, the others over 0.9 (their frames are 0.94 sure), so the weakest token flags what the utterance posterior spreads."""
    logp = np.full((6, 4), np.log(0.02))
    for t, s in enumerate([3, 3, 0, None, 0, 2]):
        if s is None:
            logp[t, 1] = logp[t, 2] = np.log(0.48)
        else:
            logp[t, s] = np.log(0.94)
    rows = run_k2(tmp_path, {"u": logp}, {"u": (3, 1, 2)})
    first, doubtful, last = rows["u"]["token_posteriors"]
    assert first > 0.9 and last > 0.9 and 0.4 < doubtful < 0.6


def test_a_token_in_long_silence_is_not_made_certain_by_its_many_frames(tmp_path):
    """30 frames of 0.9 blank, 0.05 each token: hypothesis (1,) has posterior 0.075, and its token's
    emission chances over 30 frames would add up past 1; within its window they stay near 0.2."""
    logp = np.log(np.tile([0.9, 0.05, 0.05], (30, 1)))
    row = run_k2(tmp_path, {"u": logp}, {"u": (1,)})["u"]
    assert math.exp(row["log_posterior"]) == pytest.approx(0.075, abs=0.005)
    assert 0.1 < row["token_posteriors"][0] < 0.3


def test_lm_lattice_refuses_a_grammar_of_another_token_list_and_a_weight_without_grammar(tmp_path):
    from fl_lib.confidence.ngram import TokenNgram

    (tmp_path / "G.txt").write_text(TokenNgram([[5, 1]], order=2, vocab_size=6).to_k2_str())
    with pytest.raises(AssertionError, match="built for another token list"):
        run_k2(tmp_path, {"u": np.zeros((3, 4))}, {"u": (1,)}, ("--grammar", str(tmp_path / "G.txt"),
                                                             "--lm_weight", "1"))
    with pytest.raises(AssertionError, match="lm_weight without a grammar does nothing"):
        run_k2(tmp_path, {"u": np.zeros((3, 4))}, {"u": (1,)}, ("--lm_weight", "1"))


def test_lattice_prefers_the_hypothesis_the_frames_spell(tmp_path):
    """Frames that clearly spell 3 3 _ 1 2 2 give hypothesis 3 1 2 a posterior near 1, a wrong one near 0."""
    frames = [3, 3, 0, 1, 2, 2]
    logp = np.full((len(frames), 4), np.log(0.02))
    for t, s in enumerate(frames):
        logp[t, s] = np.log(0.94)
    rows = run_k2(tmp_path, {"right": logp, "wrong": logp}, {"right": (3, 1, 2), "wrong": (3, 2)})
    assert rows["right"]["confidence"] > 0.9
    assert rows["wrong"]["log_posterior"] < math.log(0.05)


def test_lattice_rejects_token_ids_outside_the_vocabulary(tmp_path):
    with pytest.raises(AssertionError, match="outside 1..3"):
        run_k2(tmp_path, {"u": np.zeros((3, 4))}, {"u": (4,)})


def test_lattice_module_imports_nothing_from_the_main_environment():
    """It runs under python3.9 with k2's torch: ESPnet, lhotse or the main venv's packages must not load."""
    code = ("import sys, fl_lib.confidence.lattice, fl_lib.confidence.tables; "
            "bad = [m for m in ('espnet', 'espnet2', 'lhotse', 'yaml', 'jiwer') if m in sys.modules]; "
            "assert not bad, bad; print(sys.version_info[:2])")
    proc = subprocess.run([str(K2_PYTHON), "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "(3, 9)"
