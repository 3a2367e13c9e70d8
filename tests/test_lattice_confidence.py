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
