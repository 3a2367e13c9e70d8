"""Choosing the confidence filter on the sessions' dev parts, where the truth is known.

The seed labels every session's dev audio as stage 4 labels its adaptation audio;
each adaptation config then computes its confidence and applies its filter, per
session, exactly as stages 5-6 would. What is read: the WER of the labels each
filter keeps against the WER of all of them, and where two confidences disagree,
the WER of the utterances one keeps and the other drops. Nothing here touches the
adaptation or test parts.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Optional, Sequence

from fl_lib.adapt.config import AdaptConfig
from fl_lib.adapt.select import keep
from fl_lib.adapt.sessions import load_sessions
from fl_lib.asr.scoring import score
from fl_lib.confidence.tables import ranking_confidence, read_confidence, read_jsonl

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    name: str  # the adaptation config's file stem
    config: AdaptConfig
    table: Path  # its confidence.jsonl on the dev parts


def dev_truth(sessions_path: Path) -> dict[str, str]:
    """{utt_id: transcript} of every session's dev part."""
    from lhotse import load_manifest

    return {c.id: " ".join(s.text or "" for s in c.supervisions)
            for session in load_sessions(sessions_path) for c in load_manifest(session.dev)}


def kept_ids(hyps: Sequence[dict], conf: AdaptConfig, table: Path) -> set[str]:
    """The utterances `conf`'s filter keeps, session by session, ranked by `table` (select.keep's rule)."""
    confidences = read_confidence(table)
    missing = [h["utt_id"] for h in hyps if h["utt_id"] not in confidences]
    if missing:
        raise ValueError(f"{table} has no confidence for {len(missing)} dev labels, e.g. {missing[:3]}")
    sessions: dict[str, list[dict]] = {}
    for h in hyps:
        sessions.setdefault(h["session"], []).append({**h, "confidence": ranking_confidence(confidences[h["utt_id"]],
                                                                                             conf.rank_by)})
    return {r["utt_id"] for rows in sessions.values() for r in keep(rows, conf)}


def _wer(ids: set[str], hyps: dict[str, str], truth: dict[str, str]) -> dict:
    stats = score([truth[u] for u in sorted(ids)], [hyps[u] for u in sorted(ids)]) if ids else None
    return {"utts": len(ids), "words": stats.wrd if stats else 0,
            "wer": stats.percentages()["Err"] if stats else None}


def compare(hyps_path: Path, truth: dict[str, str], variants: Sequence[Variant]) -> dict:
    """Kept/dropped label WER per variant and, per pair, the WER of what only one of them keeps."""
    hyps = read_jsonl(hyps_path)
    missing = [h["utt_id"] for h in hyps if h["utt_id"] not in truth]
    if missing:
        raise ValueError(f"{hyps_path}: {len(missing)} labels without a dev transcript, e.g. {missing[:3]}")
    text = {h["utt_id"]: h["text"] for h in hyps}
    everything = set(text)
    kept = {v.name: kept_ids(hyps, v.config, v.table) for v in variants}
    rows = [{"variant": v.name, "confidence": v.config.confidence, "rank_by": v.config.rank_by,
             "kept": _wer(kept[v.name], text, truth),
             "dropped": _wer(everything - kept[v.name], text, truth)} for v in variants]
    pairs = [{"a": a.name, "b": b.name, "only_a": _wer(kept[a.name] - kept[b.name], text, truth),
              "only_b": _wer(kept[b.name] - kept[a.name], text, truth)} for a, b in combinations(variants, 2)]
    return {"hyps": str(hyps_path), "all": _wer(everything, text, truth), "variants": rows, "disagreements": pairs}


def render(result: dict) -> str:
    """The comparison as markdown: what each filter keeps, and where two disagree."""
    def pct(x: Optional[float]) -> str:
        return "–" if x is None else f"{x:.1f}"

    a = result["all"]
    lines = ["# Confidence filters on the sessions' dev parts", "",
             f"Labels: `{result['hyps']}`; all {a['utts']} dev labels ({a['words']} words): {pct(a['wer'])} % WER.", "",
             "| variant | confidence | ranked by | kept utts | kept WER % | dropped utts | dropped WER % |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in result["variants"]:
        lines.append(f"| {r['variant']} | {r['confidence']} | {r['rank_by']} | {r['kept']['utts']} | "
                     f"{pct(r['kept']['wer'])} | "
                     f"{r['dropped']['utts']} | {pct(r['dropped']['wer'])} |")
    lines += ["", "Where two filters disagree: the labels only one of them keeps.", "",
              "| A | B | only A keeps: utts | WER % | only B keeps: utts | WER % |", "|---|---|---:|---:|---:|---:|"]
    for p in result["disagreements"]:
        lines.append(f"| {p['a']} | {p['b']} | {p['only_a']['utts']} | {pct(p['only_a']['wer'])} | "
                     f"{p['only_b']['utts']} | {pct(p['only_b']['wer'])} |")
    return "\n".join(lines) + "\n"


def write(result: dict, output_dir: Path) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "confidence_dev.json").write_text(json.dumps(result, indent=2) + "\n")
    path = output_dir / "CONFIDENCE_DEV.md"
    path.write_text(render(result))
    logger.info("dev comparison of %d filters -> %s", len(result["variants"]), path)
    return path
