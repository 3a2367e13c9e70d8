"""A token n-gram language model written as a k2 acceptor: the LM of the `k2_lm` confidence lattice.

Interpolated Witten-Bell estimates over the ASR model's own token ids, so that
every token (seen or not) and the sentence end have a probability above zero
under every history, and each history's distribution sums to one. The acceptor
is deterministic and has no back-off arcs: a state is a history seen in the
text, and a token leads to the longest seen suffix of that history plus the
token. (Back-off arcs would let the same sentence take a lower order where a
higher one exists, and the lattice would sum it twice.)

Token ids are the CTC model's: 0 is blank, 1..V-1 are the tokens a hypothesis
may hold. Stdlib only: the main environment builds it, `.venv-k2` reads its text.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, Iterable, List, Sequence, Tuple

BOS = 0  # the sentence start in a history; blank never occurs in text, so its id is free there
History = Tuple[int, ...]


class TokenNgram:
    """P(token | the previous order-1 tokens), Witten-Bell interpolated down to a uniform distribution."""

    def __init__(self, sentences: Iterable[Sequence[int]], order: int, vocab_size: int):
        if order < 1:
            raise ValueError(f"n-gram order must be >= 1, got {order}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size counts blank and at least one token, got {vocab_size}")
        self.order, self.vocab_size = order, vocab_size
        self.eos = vocab_size  # the sentence end: one more outcome besides tokens 1..V-1
        self.counts: Dict[History, Dict[int, int]] = defaultdict(lambda: defaultdict(int))
        num = 0
        for sentence in sentences:
            tokens = list(sentence)
            bad = [t for t in tokens if not 0 < t < vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} outside 1..{vocab_size - 1} in sentence {num}")
            context = [BOS] + tokens
            for i, token in enumerate(tokens + [self.eos]):
                full = context[max(0, i + 1 - (order - 1)):i + 1] if order > 1 else []
                for k in range(len(full) + 1):
                    self.counts[tuple(full[len(full) - k:])][token] += 1
            num += 1
        if not num:
            raise ValueError("no sentences: an n-gram needs text")
        self.num_sentences = num
        self.counts = {h: dict(c) for h, c in self.counts.items()}
        self._cache: Dict[Tuple[History, int], float] = {}

    @property
    def outcomes(self) -> List[int]:
        """What may follow any history: tokens 1..V-1 and the sentence end."""
        return list(range(1, self.vocab_size)) + [self.eos]

    def prob(self, history: History, token: int) -> float:
        """Witten-Bell: (c(h, w) + T(h) P(w | h')) / (c(h) + T(h)), h' = h without its oldest token;
        a history never seen in the text falls back to h'; the empty history to uniform."""
        history = tuple(history)[-(self.order - 1):] if self.order > 1 else ()
        key = (history, token)
        if key not in self._cache:
            lower = self.prob(history[1:], token) if history else 1.0 / len(self.outcomes)
            seen = self.counts.get(history)
            if seen:
                total, types = sum(seen.values()), len(seen)
                lower = (seen.get(token, 0) + types * lower) / (total + types)
            self._cache[key] = lower
        return self._cache[key]

    def sentence_logprob(self, tokens: Sequence[int]) -> float:
        """log P(tokens, then the sentence end)."""
        context, total = [BOS], 0.0
        for token in list(tokens) + [self.eos]:
            total += math.log(self.prob(tuple(context), token))
            context.append(token)
        return total

    def state_of(self, history: History) -> History:
        """The acceptor state of a history: its longest suffix seen in the text (at most order-1 tokens)."""
        history = tuple(history)[-(self.order - 1):] if self.order > 1 else ()
        while history and history not in self.counts:
            history = history[1:]
        return history

    def to_k2_str(self) -> str:
        """The acceptor in k2's text format (`k2.Fsa.from_str(text, acceptor=True)`): `src dst token logprob`
        lines, the sentence end as label -1 into the final state, whose id ends the text. State 0 starts."""
        start = self.state_of((BOS,))
        states = [start] + sorted((h for h in self.counts if h != start), key=lambda h: (len(h), h))
        index = {h: i for i, h in enumerate(states)}
        final = len(states)
        lines = []
        for h in states:
            for token in range(1, self.vocab_size):
                lines.append(f"{index[h]} {index[self.state_of(h + (token,))]} {token} "
                             f"{math.log(self.prob(h, token)):.8f}")
            lines.append(f"{index[h]} {final} -1 {math.log(self.prob(h, self.eos)):.8f}")
        lines.append(str(final))
        return "\n".join(lines) + "\n"
