"""WER/CER scoring with jiwer, reported the way ESPnet's RESULTS.md tables are.

ESPnet scores with sclite on `.trn` files; sclite is not packaged for pip, so
jiwer (maintained, Levenshtein alignment) computes the counts and this module
lays them out as `|Snt|Wrd|Corr|Sub|Del|Ins|Err|S.Err|` rows.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Literal, Mapping, Sequence

import jiwer

Unit = Literal["word", "char"]
TABLE_HEADER = "|{name}|Snt|Wrd|Corr|Sub|Del|Ins|Err|S.Err|\n|---|---|---|---|---|---|---|---|---|"


@dataclasses.dataclass(frozen=True)
class ErrorStats:
    """Raw alignment counts of one scored set (words or characters)."""

    snt: int = 0
    wrd: int = 0
    corr: int = 0
    sub: int = 0
    dele: int = 0
    ins: int = 0
    snt_err: int = 0

    def __add__(self, other: ErrorStats) -> ErrorStats:
        return ErrorStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    @property
    def err(self) -> int:
        return self.sub + self.dele + self.ins

    def percentages(self) -> dict[str, float | None]:
        """Corr/Sub/Del/Ins/Err over reference units, S.Err over sentences (None: nothing to divide by)."""

        def pct(num: int, den: int) -> float | None:
            return round(100.0 * num / den, 2) if den else None

        return {
            "Corr": pct(self.corr, self.wrd),
            "Sub": pct(self.sub, self.wrd),
            "Del": pct(self.dele, self.wrd),
            "Ins": pct(self.ins, self.wrd),
            "Err": pct(self.err, self.wrd),
            "S.Err": pct(self.snt_err, self.snt),
        }

    def to_dict(self) -> dict:
        """Counts plus percentages, the form stored in score.json."""
        counts = {"Snt": self.snt, "Wrd": self.wrd, "Corr": self.corr, "Sub": self.sub,
                  "Del": self.dele, "Ins": self.ins, "S.Err_count": self.snt_err}
        return {"counts": counts, "percent": self.percentages()}

    @classmethod
    def from_dict(cls, data: Mapping) -> ErrorStats:
        c = data["counts"]
        return cls(c["Snt"], c["Wrd"], c["Corr"], c["Sub"], c["Del"], c["Ins"], c["S.Err_count"])

    def row(self, name: str) -> str:
        """One markdown table row: Snt and Wrd as counts, the rest as percentages (one decimal)."""
        cells = ["n/a" if v is None else f"{v:.1f}" for v in self.percentages().values()]
        return f"|{name}|{self.snt}|{self.wrd}|" + "|".join(cells) + "|"


def normalize(text: str) -> str:
    """Collapse whitespace: scoring must not count stray spaces as characters."""
    return " ".join(text.split())


def _units(text: str, unit: Unit) -> list[str]:
    return text.split() if unit == "word" else list(text)


def score(refs: Sequence[str], hyps: Sequence[str], unit: Unit = "word") -> ErrorStats:
    """Align each (ref, hyp) pair and sum the counts.

    Pairs with an empty reference are counted here (every hypothesis unit is an
    insertion), because older jiwer releases raise on empty references and an
    all-empty batch has nothing to align.
    """
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    refs = [normalize(r) for r in refs]
    hyps = [normalize(h) for h in hyps]
    total = ErrorStats()
    empty = [(r, h) for r, h in zip(refs, hyps) if not r]
    for _, hyp in empty:
        n_ins = len(_units(hyp, unit))
        total += ErrorStats(snt=1, ins=n_ins, snt_err=int(n_ins > 0))
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    if not pairs:
        return total
    ref_list, hyp_list = [p[0] for p in pairs], [p[1] for p in pairs]
    out = (jiwer.process_words if unit == "word" else jiwer.process_characters)(ref_list, hyp_list)
    snt_err = sum(any(chunk.type != "equal" for chunk in chunks) for chunks in out.alignments)
    wrd = sum(len(_units(r, unit)) for r in ref_list)
    return total + ErrorStats(
        snt=len(pairs), wrd=wrd, corr=out.hits, sub=out.substitutions,
        dele=out.deletions, ins=out.insertions, snt_err=snt_err,
    )


def score_by_speaker(
    refs: Sequence[str], hyps: Sequence[str], speakers: Sequence[str], unit: Unit = "word"
) -> dict[str, ErrorStats]:
    """Per-speaker counts, speakers in first-seen order: the table that shows who the model fails."""
    groups: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for ref, hyp, spk in zip(refs, hyps, speakers, strict=True):
        groups[spk][0].append(ref)
        groups[spk][1].append(hyp)
    return {spk: score(r, h, unit) for spk, (r, h) in groups.items()}


def format_table(rows: Mapping[str, ErrorStats], name: str = "dataset") -> str:
    """ESPnet's RESULTS.md table for {row name: stats}."""
    return "\n".join([TABLE_HEADER.format(name=name), *(s.row(n) for n, s in rows.items())])


def write_trn(path: Path, texts: Sequence[str], utt_ids: Sequence[str], speakers: Sequence[str]) -> None:
    """sclite `trn` file as ESPnet's asr.sh writes it: `TEXT<TAB>(spk-uttid)` per line."""
    with open(path, "w", encoding="utf-8") as f:
        for text, utt, spk in zip(texts, utt_ids, speakers, strict=True):
            f.write(f"{normalize(text)}\t({spk}-{utt})\n")
