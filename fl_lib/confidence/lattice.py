"""Utterance posterior of a CTC hypothesis from k2 lattices (runs in `.venv-k2`).

    $FL_K2_PYTHON -m fl_lib.confidence.lattice --hyps hyps.jsonl --logp_scp logp.scp \
        --output confidence.jsonl

For each utterance, the CTC lattice is k2's CTC topology intersected with the
model's per-frame log-posteriors (`k2.ctc_topo`, `k2.DenseFsaVec`,
`k2.intersect_dense`); its total score (log semiring) sums every alignment of
every label sequence. The hypothesis' score sums the alignments that collapse to
the hypothesis (the CTC topology composed with the hypothesis: `k2.ctc_graph`).
Their difference is log P(hypothesis | audio), the utterance-level posterior;
a frame-normalized softmax makes the total 0, but it is computed, not assumed, so
scores that are not normalized (or pruned lattices) still give a posterior.

Imports: numpy, torch, kaldiio, k2 and the standard library only (python3.9).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from fl_lib.confidence.tables import confidence_row, read_jsonl, write_jsonl
from fl_lib.log import setup_logging

logger = logging.getLogger(__name__)


def log_posteriors(logps: Sequence[torch.Tensor], hyps: Sequence[Sequence[int]],
                   output_beam: float = 1e4) -> List[float]:
    """log P(hyp_i | x_i) for [T_i, V] log-posterior matrices (blank = 0) and token-id hypotheses.

    `output_beam` prunes the lattices; the default keeps every path, so the result
    is exact (within float64 accumulation of float32 scores).
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
    lattices = k2.intersect_dense(k2.create_fsa_vec([topo] * len(order)), dense, output_beam=output_beam)
    total = lattices.get_tot_scores(log_semiring=True, use_double_scores=True)
    graphs = k2.ctc_graph([list(hyps[i]) for i in order], modified=False)
    hyp_lattices = k2.intersect_dense(graphs, dense, output_beam=output_beam)
    hyp_score = hyp_lattices.get_tot_scores(log_semiring=True, use_double_scores=True)
    out = [0.0] * len(order)
    for row, i in enumerate(order):
        out[i] = float(hyp_score[row] - total[row])
    return out


def score_table(hyps_path: Path, logp_scp: Path, output: Path, batch_size: int = 32,
                output_beam: float = 1e4) -> int:
    """Write confidence.jsonl (method k2) for every utterance of hyps.jsonl; returns their number."""
    import kaldiio

    hyps = read_jsonl(hyps_path)
    mats = kaldiio.load_scp(str(logp_scp))
    missing = [h["utt_id"] for h in hyps if h["utt_id"] not in mats]
    if missing:
        raise ValueError(f"{logp_scp} lacks the posteriors of {len(missing)} hypotheses, e.g. {missing[:3]}")
    results: Dict[str, float] = {}
    start = time.perf_counter()
    for first in range(0, len(hyps), batch_size):
        chunk = hyps[first:first + batch_size]
        logps = [torch.from_numpy(mats[h["utt_id"]]) for h in chunk]
        scores = log_posteriors(logps, [h["token_int"] for h in chunk], output_beam)
        results.update({h["utt_id"]: s for h, s in zip(chunk, scores)})
        logger.info("k2 lattice confidence: %d/%d utterances", min(first + batch_size, len(hyps)), len(hyps))
    write_jsonl(output, (confidence_row(h["utt_id"], "k2", results[h["utt_id"]], len(h["token_int"]))
                         for h in hyps))
    logger.info("k2 confidence of %d utterances -> %s (%.1f s)", len(hyps), output, time.perf_counter() - start)
    return len(hyps)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hyps", type=Path, required=True, help="hyps.jsonl of the pseudo-labelling stage")
    p.add_argument("--logp_scp", type=Path, required=True, help="Kaldi scp of the CTC log-posteriors [T, V]")
    p.add_argument("--output", type=Path, required=True, help="confidence.jsonl to write")
    p.add_argument("--batch_size", type=int, default=32, help="utterances per k2 batch")
    p.add_argument("--output_beam", type=float, default=1e4, help="lattice pruning beam; the default prunes nothing")
    args = p.parse_args(argv)
    setup_logging()
    torch.set_num_threads(1)
    score_table(args.hyps, args.logp_scp, args.output, args.batch_size, args.output_beam)


if __name__ == "__main__":
    main(sys.argv[1:])
