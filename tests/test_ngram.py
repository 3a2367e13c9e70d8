"""fl_lib.confidence.ngram: the token n-gram of the k2_lm confidence is a proper, smoothed LM."""
from __future__ import annotations

import itertools
import math

import pytest

from fl_lib.confidence.ngram import BOS, TokenNgram

TEXT = [[1, 2], [1, 2, 3], [2, 2], [1], [3, 1, 2]]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_history_is_a_distribution_with_nothing_at_zero(order):
    lm = TokenNgram(TEXT, order=order, vocab_size=5)  # token 4 never occurs in the text
    for history in [(), (BOS,), (1,), (BOS, 1), (2, 2), (4,), (4, 4, 4), (3, 1)]:
        probs = [lm.prob(history, w) for w in lm.outcomes]
        assert sum(probs) == pytest.approx(1.0, abs=1e-12), history
        assert min(probs) > 0, history


def test_sentence_probabilities_sum_to_one_over_all_sentences():
    """Sum P(y) over every token sequence up to length 8: it approaches 1 from below (no mass lost or doubled)."""
    lm = TokenNgram([[1, 2], [2, 2], [1], [2, 1, 2]], order=3, vocab_size=3)
    mass = [sum(math.exp(lm.sentence_logprob(y)) for y in itertools.product((1, 2), repeat=n)) for n in range(9)]
    assert 0.97 < sum(mass) < 1.0
    assert all(b < a for a, b in zip(mass[2:], mass[3:]))  # the tail shrinks


def test_witten_bell_by_hand():
    """Bigram on [1 2], [1 1]: after BOS, c = {1: 2}, T = 1; unigram counts {1: 3, 2: 1, eos: 2}, T = 3."""
    lm = TokenNgram([[1, 2], [1, 1]], order=2, vocab_size=3)
    uniform = 1 / 3  # tokens 1, 2 and the sentence end
    p_uni = {1: (3 + 3 * uniform) / (6 + 3), 2: (1 + 3 * uniform) / 9, lm.eos: (2 + 3 * uniform) / 9}
    assert lm.prob((), 2) == pytest.approx(p_uni[2])
    assert lm.prob((BOS,), 1) == pytest.approx((2 + 1 * p_uni[1]) / (2 + 1))
    assert lm.prob((BOS,), 2) == pytest.approx((0 + 1 * p_uni[2]) / (2 + 1))
    assert lm.prob((2,), 1) == pytest.approx((0 + 1 * p_uni[1]) / (1 + 1))  # after 2: only the end was seen
    assert lm.sentence_logprob([1, 2]) == pytest.approx(
        math.log(lm.prob((BOS,), 1) * lm.prob((1,), 2) * lm.prob((2,), lm.eos)))


def test_acceptor_text_is_deterministic_starts_at_the_sentence_start_and_ends_with_the_final_state():
    lm = TokenNgram(TEXT, order=3, vocab_size=4)
    lines = lm.to_k2_str().splitlines()
    final = int(lines[-1])
    arcs = [tuple(line.split()) for line in lines[:-1]]
    by_state = {}
    for src, dst, label, score in arcs:
        by_state.setdefault(int(src), []).append(int(label))
        assert int(dst) <= final and (int(dst) == final) == (label == "-1")
        assert float(score) < 0
    assert all(sorted(labels) == [-1, 1, 2, 3] for labels in by_state.values())  # one arc per outcome
    assert len(by_state) == final  # every state but the final one has arcs
    # State 0 is the sentence start: its arc for token 1 carries log P(1 | BOS).
    start_1 = next(float(s) for src, _, label, s in arcs if src == "0" and label == "1")
    assert start_1 == pytest.approx(math.log(lm.prob((BOS,), 1)), abs=1e-7)


def test_text_outside_the_vocabulary_and_no_text_are_errors():
    with pytest.raises(ValueError, match="outside 1..2"):
        TokenNgram([[1, 3]], order=2, vocab_size=3)
    with pytest.raises(ValueError, match="no sentences"):
        TokenNgram([], order=2, vocab_size=3)
