"""The files that pseudo-labelling, confidence and filtering exchange (python3.9, stdlib only).

Both environments read them: the main one writes hypotheses, `.venv-k2` writes
confidences, and neither imports the other's packages.

- ``hyps.jsonl``: one decoded utterance per line: utt_id, session, text,
  token_int (the hypothesis' token ids, no blank/sos/eos), score (ESPnet's beam
  score), num_frames (CTC frames in ``logp.scp``).
- ``confidence.jsonl``: utt_id, method, log_posterior (log P(hypothesis | audio)),
  num_tokens and confidence, the per-token geometric mean exp(log_posterior / num_tokens);
  the k2 methods add token_posteriors, each token's posterior in the lattice.
  ``method`` is what made the row (``k2``, ``k2_lm``, or ``beam_score`` also when k2 fell back):
  the filter and the results read it from here, never from a config.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from ..atomic import atomic_path  # stdlib only: importable in .venv-k2 too

METHODS = ("k2", "k2_lm", "beam_score")
K2_METHODS = ("k2", "k2_lm")  # made from k2 lattices (.venv-k2): they alone give token posteriors
RANK_BY = ("utterance", "weakest_token")


def read_jsonl(path: Path) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Written beside the target and renamed, so a killed run never leaves half a table."""
    with atomic_path(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def per_token(log_posterior: float, num_tokens: int) -> float:
    """exp(log_posterior / num_tokens): the raw posterior shrinks with every token, so without
    this a threshold would keep short utterances only. An empty hypothesis counts as one token."""
    return math.exp(log_posterior / max(num_tokens, 1))


def confidence_row(utt_id: str, method: str, log_posterior: float, num_tokens: int,
                   token_posteriors: Optional[List[float]] = None) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown confidence method '{method}'; choose {', '.join(METHODS)}")
    row = {"utt_id": utt_id, "method": method, "log_posterior": log_posterior,
           "num_tokens": num_tokens, "confidence": per_token(log_posterior, num_tokens)}
    if token_posteriors is not None:
        if len(token_posteriors) != num_tokens:
            raise ValueError(f"{utt_id}: {len(token_posteriors)} token posteriors for {num_tokens} tokens")
        row["token_posteriors"] = list(token_posteriors)
    return row


def ranking_confidence(row: dict, rank_by: str) -> float:
    """What a filter ranks by: the utterance's per-token geometric mean posterior (`utterance`), or its
    least confident token's posterior (`weakest_token`; 1 for an empty hypothesis, which no filter keeps)."""
    if rank_by == "utterance":
        return row["confidence"]
    if rank_by != "weakest_token":
        raise ValueError(f"unknown rank_by '{rank_by}'; choose {', '.join(RANK_BY)}")
    if "token_posteriors" not in row:
        raise ValueError(f"{row['utt_id']}: its confidence ({row['method']}) has no token posteriors, which "
                         "rank_by: weakest_token needs: only the k2 lattices give them (run stage 5 again)")
    return min(row["token_posteriors"], default=1.0)


def read_confidence(path: Path) -> Dict[str, dict]:
    """{utt_id: row} of a confidence.jsonl."""
    return {row["utt_id"]: row for row in read_jsonl(path)}


def table_method(path: Path) -> str:
    """The method that made a confidence.jsonl, as its rows record it: one of METHODS, the same in every row."""
    methods = sorted({str(row.get("method")) for row in read_jsonl(path)})
    if not methods:
        raise ValueError(f"{path} has no rows: no method made it")
    if len(methods) > 1 or methods[0] not in METHODS:
        raise ValueError(f"{path} was made by {' and '.join(methods)}: a confidence table has one method "
                         f"of {', '.join(METHODS)}")
    return methods[0]
