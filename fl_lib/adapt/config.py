"""What a session-adaptation run does with its pseudo-labels: conf/adapt*.yaml, typed.

Keys that the chosen labels or filter would ignore are rejected, not silently unused.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from fl_lib.confidence.tables import K2_METHODS, METHODS, RANK_BY
from fl_lib.fl.config import load_config

LABELS = ("pseudo", "oracle")
FILTERS = ("none", "threshold", "top_fraction")


@dataclass
class AdaptConfig:
    # pseudo: the teacher's hypotheses; oracle: the true transcripts (the ablation's upper bound,
    # the one run that reads the adaptation truth before scoring).
    labels: str = "pseudo"
    # k2 (CTC lattice posterior, .venv-k2) | k2_lm (the lattice with a token n-gram of the LM text)
    # | beam_score (ESPnet's beam score)
    confidence: Optional[str] = None
    ngram_order: Optional[int] = None  # confidence: k2_lm: order of the token n-gram
    lm_weight: Optional[float] = None  # confidence: k2_lm: scale of its log-probabilities in the lattice
    # utterance: the per-token geometric mean of the utterance posterior | weakest_token: its least
    # confident token's lattice posterior (k2 and k2_lm only)
    rank_by: str = "utterance"
    filter: str = "none"  # none | threshold | top_fraction (per session)
    threshold: Optional[float] = None  # filter: threshold: keep confidence >= threshold
    top_fraction: Optional[float] = None  # filter: top_fraction: keep this share of each session, most confident first
    generations: int = 1  # >1: re-label with the previous generation's adapted model (noisy student)

    def __post_init__(self) -> None:
        if self.labels not in LABELS:
            raise ValueError(f"unknown labels '{self.labels}'; choose {', '.join(LABELS)}")
        if self.filter not in FILTERS:
            raise ValueError(f"unknown filter '{self.filter}'; choose {', '.join(FILTERS)}")
        if self.generations < 1:
            raise ValueError(f"generations must be >= 1, got {self.generations}")
        if self.labels == "oracle":
            if (self.filter != "none" or self.confidence is not None or self.generations != 1
                    or self.rank_by != "utterance"):
                raise ValueError("labels: oracle trains on the true transcripts: set filter: none, confidence: null, "
                                 "generations: 1 and leave rank_by out (confidence, filters and re-labelling do "
                                 "nothing there)")
            return
        if self.filter == "none" and (self.confidence is not None or self.rank_by != "utterance"):
            raise ValueError("filter: none keeps every pseudo-label, so confidence and rank_by do nothing: "
                             "set confidence: null and leave rank_by out")
        if self.filter != "none" and self.confidence not in METHODS:
            raise ValueError(f"filter: {self.filter} needs confidence: one of {', '.join(METHODS)}, "
                             f"got {self.confidence}")
        if self.rank_by not in RANK_BY:
            raise ValueError(f"unknown rank_by '{self.rank_by}'; choose {', '.join(RANK_BY)}")
        if self.rank_by == "weakest_token" and self.confidence not in K2_METHODS:
            raise ValueError(f"rank_by: weakest_token needs the token posteriors of the k2 lattices (confidence: k2 "
                             f"or k2_lm), but confidence is '{self.confidence}'")
        if self.confidence == "k2_lm":
            if self.ngram_order is None or self.ngram_order < 1 or self.lm_weight is None or not self.lm_weight > 0:
                raise ValueError(f"confidence: k2_lm needs ngram_order >= 1 and lm_weight > 0, got "
                                 f"{self.ngram_order} and {self.lm_weight}")
        elif self.ngram_order is not None or self.lm_weight is not None:
            raise ValueError(f"ngram_order and lm_weight are only used by confidence: k2_lm, but confidence "
                             f"is '{self.confidence}'")
        if self.filter == "threshold":
            if self.threshold is None or not 0.0 <= self.threshold <= 1.0:
                raise ValueError(f"filter: threshold needs threshold in [0, 1], got {self.threshold}")
        elif self.threshold is not None:
            raise ValueError(f"threshold is only used by filter: threshold, but filter is '{self.filter}'")
        if self.filter == "top_fraction":
            if self.top_fraction is None or not 0.0 < self.top_fraction <= 1.0:
                raise ValueError(f"filter: top_fraction needs top_fraction in (0, 1], got {self.top_fraction}")
        elif self.top_fraction is not None:
            raise ValueError(f"top_fraction is only used by filter: top_fraction, but filter is '{self.filter}'")

    @classmethod
    def from_yaml(cls, path: Optional[Path], overrides: Sequence[str] = ()) -> "AdaptConfig":
        return load_config(cls, path, overrides)

    def to_dict(self) -> dict:
        return asdict(self)
