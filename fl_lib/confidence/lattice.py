"""Utterance posterior of a CTC hypothesis from k2 lattices (runs in `.venv-k2`).

    $FL_K2_PYTHON -m fl_lib.confidence.lattice --hyps hyps.jsonl --logp_scp logp.scp \
        --output confidence.jsonl [--grammar G.txt --lm_weight 0.5]

For each utterance, the CTC lattice is k2's CTC topology intersected with the
model's per-frame log-posteriors (`k2.ctc_topo`, `k2.DenseFsaVec`,
`k2.intersect_dense`); its total score (log semiring) sums every alignment of
every label sequence. The hypothesis' score sums the alignments that collapse to
the hypothesis (the CTC topology composed with the hypothesis: `k2.ctc_graph`).
Their difference is log P(hypothesis | audio), the utterance-level posterior;
a frame-normalized softmax makes the total 0, but it is computed, not assumed, so
scores that are not normalized (or pruned lattices) still give a posterior.

With `--grammar` (method `k2_lm`), both graphs are first composed with a token
n-gram acceptor (fl_lib.confidence.ngram) whose log-probabilities are scaled by
`--lm_weight`, as shallow fusion scales its LM: every label sequence y then
weighs P_ctc(y | x) P_lm(y)^lm_weight, and the posterior is the hypothesis'
share of that sum. A hypothesis the acoustics favour but the language model
finds unlikely loses confidence to the sequences the n-gram prefers; with a
uniform n-gram or lm_weight 0 it is the CTC-only posterior again.

Each row also gives every token's posterior (`token_posteriors`, see `posteriors`):
an utterance whose sum of paths is dominated by the hypothesis can still hold one
token that the lattice doubts, and a filter by the weakest token
(rank_by: weakest_token) drops it.

Imports: numpy, torch, kaldiio, k2 and the standard library only (python3.9).
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fl_lib.confidence.tables import confidence_row, read_jsonl, write_jsonl
from fl_lib.log import setup_logging

logger = logging.getLogger(__name__)
TOKEN_WINDOW = 2  # frames either side of a token's emission frame in which the lattice's emissions of it count


def load_grammar(text: str, lm_weight: float):
    """The n-gram acceptor of `text` (k2's text format), arc-sorted, its scores times `lm_weight`."""
    import k2

    if lm_weight <= 0:
        raise ValueError(f"lm_weight must be > 0 with a grammar (0 is the CTC-only posterior: no grammar), "
                         f"got {lm_weight}")
    grammar = k2.Fsa.from_str(text, acceptor=True)
    grammar.scores = grammar.scores * lm_weight
    return k2.arc_sort(grammar)


def posteriors(logps: Sequence[torch.Tensor], hyps: Sequence[Sequence[int]], output_beam: float = 1e4,
               grammar=None) -> List[Tuple[float, List[float]]]:
    """(log P(hyp_i | x_i), token posteriors of hyp_i) for [T_i, V] log-posterior matrices (blank = 0)
    and token-id hypotheses; with `grammar` (load_grammar's acceptor over token ids), under
    P_ctc P_lm^weight.

    A token's posterior is read off the full lattice's arc posteriors (forward-backward):
    the expected number of times the lattice emits that token (an arc whose output label
    is it) within the token's window, capped at 1. The window is the frame where the
    hypothesis' best alignment emits the token, TOKEN_WINDOW frames either side, cut
    halfway to the neighbouring tokens' emission frames: a token competes with every
    label sequence that puts something else there, while a wide window (the silence
    before a first word) cannot add up many small emission chances to a certainty.
    `output_beam` prunes the lattices; the default keeps every path, so the results are
    exact (within float64 accumulation of float32 scores).
    """
    import k2

    if len(logps) != len(hyps):
        raise ValueError(f"{len(logps)} posterior matrices but {len(hyps)} hypotheses")
    if not logps:
        return []
    vocab = {int(m.shape[1]) for m in logps}
    if len(vocab) != 1:
        raise ValueError(f"posterior matrices have different vocabulary sizes {sorted(vocab)}")
    (num_classes,) = vocab
    for hyp in hyps:
        if any(not 0 < t < num_classes for t in hyp):
            raise ValueError(f"hypothesis {list(hyp)} has token ids outside 1..{num_classes - 1} (0 is blank)")
    # DenseFsaVec wants its segments longest first.
    order = sorted(range(len(logps)), key=lambda i: -logps[i].shape[0])
    frames = max(m.shape[0] for m in logps)
    batch = torch.full((len(logps), frames, num_classes), -float("inf"), dtype=torch.float32)
    for row, i in enumerate(order):
        batch[row, : logps[i].shape[0]] = logps[i].float()
    segments = torch.tensor([[row, 0, logps[i].shape[0]] for row, i in enumerate(order)], dtype=torch.int32)
    dense = k2.DenseFsaVec(batch, segments)

    topo = k2.arc_sort(k2.ctc_topo(num_classes - 1, modified=False))
    graphs = k2.ctc_graph([list(hyps[i]) for i in order], modified=False)
    if grammar is not None:
        labels = grammar.labels[grammar.labels > 0]
        if len(labels) and int(labels.max()) >= num_classes:
            raise ValueError(f"the grammar has token ids up to {int(labels.max())}, the posteriors only "
                             f"{num_classes - 1}: it was built for another token list")
        topo = k2.arc_sort(k2.connect(k2.compose(topo, grammar)))
        graphs = k2.compose(graphs, grammar)
    lattices = k2.intersect_dense(k2.create_fsa_vec([topo] * len(order)), dense, output_beam=output_beam,
                                  frame_idx_name="frame")
    total = lattices.get_tot_scores(log_semiring=True, use_double_scores=True)
    hyp_lattices = k2.intersect_dense(graphs, dense, output_beam=output_beam, frame_idx_name="frame")
    hyp_score = hyp_lattices.get_tot_scores(log_semiring=True, use_double_scores=True)
    best = k2.shortest_path(hyp_lattices, use_double_scores=True)

    arc_post = lattices.get_arc_post(use_double_scores=True, log_semiring=True).exp()
    state_splits = lattices.arcs.shape().row_splits(1).long()
    arc_splits = lattices.arcs.shape().row_splits(2).long()
    best_shape = best.arcs.shape()
    best_fsa = best_shape.row_ids(1).long()[best_shape.row_ids(2).long()]
    out: List[Tuple[float, List[float]]] = [(0.0, [])] * len(order)
    for row, i in enumerate(order):
        log_posterior = float(hyp_score[row] - total[row])
        if not math.isfinite(float(hyp_score[row])):  # no alignment spells the hypothesis (or the beam pruned them all)
            out[i] = (-math.inf, [0.0] * len(hyps[i]))
            continue
        mine = best_fsa == row
        starts = best.frame[mine][best.aux_labels[mine] > 0].tolist()
        if len(starts) != len(hyps[i]):
            raise RuntimeError(f"the best alignment of hypothesis {list(hyps[i])} emits {len(starts)} tokens")
        mids = [(a + b + 1) // 2 for a, b in zip(starts, starts[1:])]
        lo = torch.tensor([max(t - TOKEN_WINDOW, m) for t, m in zip(starts, [0] + mids)], dtype=torch.long)
        hi = torch.tensor([min(t + TOKEN_WINDOW + 1, m) for t, m in zip(starts, mids + [logps[i].shape[0]])],
                          dtype=torch.long)
        # this row's arcs (an FsaVec keeps each FSA's arcs together), each given the window its frame falls in
        first, last = arc_splits[state_splits[row]], arc_splits[state_splits[row + 1]]
        frame = lattices.frame[first:last].long()
        window = torch.bucketize(frame, hi, right=True).clamp(max=max(len(starts) - 1, 0))
        tokens = torch.tensor(list(hyps[i]), dtype=torch.long)
        counts = torch.zeros(len(starts), dtype=torch.float64)
        if len(starts):
            emitted = lattices.aux_labels[first:last].long()
            hit = (frame >= lo[window]) & (frame < hi[window]) & (emitted == tokens[window])
            counts.index_add_(0, window[hit], arc_post[first:last][hit].double())
        out[i] = (log_posterior, counts.clamp(max=1.0).tolist())
    return out


def score_table(hyps_path: Path, logp_scp: Path, output: Path, batch_size: int = 32,
                output_beam: float = 1e4, grammar_path: Optional[Path] = None, lm_weight: float = 0.0) -> int:
    """Write confidence.jsonl (method k2, or k2_lm with a grammar) for every utterance of hyps.jsonl;
    returns their number."""
    import kaldiio

    if grammar_path is None and lm_weight:
        raise ValueError("lm_weight without a grammar does nothing: give --grammar, or drop --lm_weight")
    grammar = load_grammar(Path(grammar_path).read_text(), lm_weight) if grammar_path else None
    method = "k2_lm" if grammar_path else "k2"

    hyps = read_jsonl(hyps_path)
    mats = kaldiio.load_scp(str(logp_scp))
    missing = [h["utt_id"] for h in hyps if h["utt_id"] not in mats]
    if missing:
        raise ValueError(f"{logp_scp} lacks the posteriors of {len(missing)} hypotheses, e.g. {missing[:3]}")
    results: Dict[str, Tuple[float, List[float]]] = {}
    start = time.perf_counter()
    for first in range(0, len(hyps), batch_size):
        chunk = hyps[first:first + batch_size]
        logps = [torch.from_numpy(mats[h["utt_id"]]) for h in chunk]
        scores = posteriors(logps, [h["token_int"] for h in chunk], output_beam, grammar)
        results.update({h["utt_id"]: s for h, s in zip(chunk, scores)})
        logger.info("%s lattice confidence: %d/%d utterances", method, min(first + batch_size, len(hyps)), len(hyps))
    write_jsonl(output, (confidence_row(h["utt_id"], method, results[h["utt_id"]][0], len(h["token_int"]),
                                        results[h["utt_id"]][1]) for h in hyps))
    logger.info("%s confidence of %d utterances -> %s (%.1f s)", method, len(hyps), output,
                time.perf_counter() - start)
    return len(hyps)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hyps", type=Path, required=True, help="hyps.jsonl of the pseudo-labelling stage")
    p.add_argument("--logp_scp", type=Path, required=True, help="Kaldi scp of the CTC log-posteriors [T, V]")
    p.add_argument("--output", type=Path, required=True, help="confidence.jsonl to write")
    p.add_argument("--batch_size", type=int, default=32, help="utterances per k2 batch")
    p.add_argument("--output_beam", type=float, default=1e4, help="lattice pruning beam; the default prunes nothing")
    p.add_argument("--grammar", type=Path, help="token n-gram acceptor (k2 text, fl_lib.confidence.ngram): method k2_lm")
    p.add_argument("--lm_weight", type=float, default=0.0, help="scale of the grammar's log-probabilities")
    args = p.parse_args(argv)
    setup_logging()
    torch.set_num_threads(1)
    score_table(args.hyps, args.logp_scp, args.output, args.batch_size, args.output_beam, args.grammar,
                args.lm_weight)


if __name__ == "__main__":
    main(sys.argv[1:])
