"""Stage 6: keep the confident pseudo-labels and write them as federated clients.

Each session becomes one client whose cuts carry its kept pseudo-labels as
transcripts. The filter is per session (a top fraction) or global (a
threshold); a session left with nothing is skipped and counted, an empty
hypothesis is never kept (it has nothing to train on). A confidence table made by
another method than the config's (a beam-score fallback where the config says k2)
is refused, so a run never reports one method while filtering by another. With
labels: oracle the true transcripts replace the pseudo-labels: the ablation's upper
bound, and the only path before scoring that opens ``truth/adapt_text``.
"""
from __future__ import annotations

import gzip
import json
import logging
import math
from pathlib import Path
from typing import Optional

from fl_lib.adapt.config import AdaptConfig
from fl_lib.adapt.sessions import load_sessions
from fl_lib.atomic import atomic_path
from fl_lib.confidence.tables import ranking_confidence, read_confidence, read_jsonl, table_method
from fl_lib.data.clients import safe_file_name
from fl_lib.data.markers import file_stamp, is_done, mark_done

logger = logging.getLogger(__name__)
DONE_MARKER = ".select_labels.done"


def read_text_table(path: Path) -> dict[str, str]:
    """Kaldi text: `utt_id words...` per line."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            utt, _, text = line.partition(" ")
            out[utt] = text.strip()
    return out


def keep(rows: list[dict], conf: AdaptConfig) -> list[dict]:
    """The rows of one session that the filter keeps (rows carry `confidence`; empty texts never count)."""
    rows = [r for r in rows if r["text"].strip()]
    if conf.filter == "none":
        return rows
    if conf.filter == "threshold":
        return [r for r in rows if r["confidence"] >= conf.threshold]
    ranked = sorted(rows, key=lambda r: (-r["confidence"], r["utt_id"]))
    return ranked[: math.ceil(conf.top_fraction * len(rows))]


def select_labels(sessions_path: Path, conf: AdaptConfig, output_dir: Path, hyps: Optional[Path] = None,
                  confidence: Optional[Path] = None, oracle_text: Optional[Path] = None) -> Path:
    """Write output_dir/{clients.jsonl, cuts/<session>.jsonl.gz, selection.json}; return clients.jsonl."""
    output_dir = Path(output_dir)
    if conf.labels == "oracle":
        if oracle_text is None or hyps is not None or confidence is not None:
            raise ValueError("labels: oracle takes the true transcripts (oracle_text) and no hypotheses")
        inputs = {"oracle_text": file_stamp(oracle_text)}
    else:
        if hyps is None or oracle_text is not None:
            raise ValueError("labels: pseudo takes hyps.jsonl and never the true transcripts")
        if (confidence is None) != (conf.filter == "none"):
            raise ValueError(f"filter: {conf.filter} {'takes no' if confidence else 'needs a'} confidence table")
        inputs = {"hyps": file_stamp(hyps)}
        if confidence is not None:
            method = table_method(confidence)
            if method != conf.confidence:
                raise ValueError(
                    f"{confidence} was made by {method} but the adaptation config says confidence: "
                    f"{conf.confidence}; " + ("k2 was missing when stage 5 ran (it fell back to the beam score): "
                                              "build .venv-k2 (make install) and run stage 5 again, or filter by "
                                              "the beam score (confidence: beam_score, conf/adapt_beam.yaml)"
                                              if method == "beam_score" else "run stage 5 again with this config"))
            inputs.update(confidence=file_stamp(confidence), confidence_method=method)
    sessions = load_sessions(sessions_path)
    clients_path = output_dir / "clients.jsonl"
    done = output_dir / DONE_MARKER
    stamp = {"sessions": file_stamp(sessions_path), "conf": conf.to_dict(), **inputs}
    if is_done(done, stamp, [clients_path]):
        logger.info("labels already selected in %s: skipping", output_dir)
        return clients_path
    done.unlink(missing_ok=True)
    (output_dir / "cuts").mkdir(parents=True, exist_ok=True)

    if conf.labels == "oracle":
        truth = read_text_table(oracle_text)
        labels = {u: {"utt_id": u, "text": t} for u, t in truth.items()}
    else:
        labels = {r["utt_id"]: r for r in read_jsonl(hyps)}
        if confidence is not None:
            table = read_confidence(confidence)
            missing = sorted(set(labels) - set(table))
            if missing:
                raise ValueError(f"{confidence} has no confidence for {len(missing)} pseudo-labels, e.g. {missing[:3]}")
            for u, row in labels.items():
                row["confidence"] = ranking_confidence(table[u], conf.rank_by)

    clients, summary, skipped = [], {}, []
    for s in sessions:
        with gzip.open(s.adapt, "rt", encoding="utf-8") as f:
            cuts = [json.loads(line) for line in f if line.strip()]
        rows = [labels[c["id"]] for c in cuts if c["id"] in labels]
        kept = keep(rows, conf)
        kept_ids = {r["utt_id"] for r in kept}
        summary[s.id] = {"utts": len(cuts), "labelled": len(rows), "kept": len(kept), "kept_ids": sorted(kept_ids)}
        logger.info("session %s: keeps %d of %d pseudo-labels (%s)", s.id, len(kept), len(rows), conf.filter)
        if not kept:
            skipped.append(s.id)
            logger.warning("session %s skipped: every pseudo-label was filtered out", s.id)
            continue
        text = {r["utt_id"]: r["text"] for r in kept}
        out_cuts = []
        for c in cuts:
            if c["id"] in text:
                c["supervisions"] = [{**sup, "text": text[c["id"]]} for sup in c["supervisions"]]
                out_cuts.append(c)
        rel = Path("cuts") / f"{safe_file_name(s.id)}.jsonl.gz"
        with atomic_path(output_dir / rel) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in out_cuts)
        clients.append({"id": s.id, "num_cuts": len(out_cuts),
                        "duration": round(sum(c["duration"] for c in out_cuts), 3), "manifest": str(rel)})
    if not clients:
        raise ValueError(f"every session's pseudo-labels were filtered out ({len(skipped)} sessions): "
                         "lower the threshold or raise top_fraction")
    if skipped:
        logger.warning("%d of %d sessions skipped with no kept pseudo-label: %s", len(skipped), len(sessions), skipped)
    with atomic_path(clients_path) as tmp:
        tmp.write_text("".join(json.dumps(c) + "\n" for c in clients), encoding="utf-8")
    (output_dir / "selection.json").write_text(json.dumps(
        {"config": conf.to_dict(), "hyps": None if hyps is None else str(Path(hyps).resolve()),
         "confidence": None if confidence is None else str(Path(confidence).resolve()),
         "confidence_method": inputs.get("confidence_method"),
         "sessions": summary, "skipped_sessions": skipped}, indent=2) + "\n")
    logger.info("%d clients, %d utterances -> %s", len(clients), sum(c["num_cuts"] for c in clients), clients_path)
    mark_done(done, stamp)
    return clients_path
