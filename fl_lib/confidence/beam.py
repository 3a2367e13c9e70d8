"""The fallback confidence: ESPnet's beam score of the hypothesis, normalized per token.

With a CTC-only model and no language model, the beam score is the CTC prefix
score of the finished hypothesis, so it estimates the same log P(hypothesis | audio)
as the k2 lattice, without checking it against the lattice's total.
"""
from __future__ import annotations

import logging
from pathlib import Path

from fl_lib.confidence.tables import confidence_row, read_jsonl, write_jsonl

logger = logging.getLogger(__name__)


def beam_score_table(hyps_path: Path, output: Path) -> int:
    """Write confidence.jsonl (method beam_score) from hyps.jsonl; returns the number of utterances."""
    hyps = read_jsonl(hyps_path)
    write_jsonl(output, (confidence_row(h["utt_id"], "beam_score", h["score"], len(h["token_int"])) for h in hyps))
    logger.info("beam-score confidence of %d utterances -> %s", len(hyps), output)
    return len(hyps)
