"""Stage 2: each session's audio, split (seeded) into an adaptation part and a test part.

The truth of the adaptation part is kept out of reach by the data layout, not by
discipline: the adaptation manifests are written with every supervision's text
removed, and the transcripts go to ``truth/adapt_text``, which only scoring (and the
oracle ablation, on request) opens. Which utterance lands in which part depends on
the utterance ids and the seed alone, so the adaptation manifests are the same
bytes whatever the transcripts say.

Layout under ``output_dir``::

    sessions.jsonl           one line per session: id, adapt/test manifests and sizes
    adapt/<session>.jsonl.gz cuts without transcripts
    test/<session>.jsonl.gz  cuts with transcripts (scored at the last stage)
    test.jsonl.gz            every session's test cuts, decoded in one pass
    truth/adapt_text         Kaldi text of the adaptation parts
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import random
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from fl_lib.atomic import atomic_path
from fl_lib.data.clients import safe_file_name
from fl_lib.data.markers import file_stamp, is_done, mark_done

logger = logging.getLogger(__name__)
DONE_MARKER = ".split_sessions.done"


@dataclass(frozen=True)
class Session:
    """One session (client): its adaptation manifest (no transcripts) and its test manifest."""

    id: str
    adapt: Path
    test: Path
    num_adapt: int
    num_test: int


def load_sessions(path: Path) -> list[Session]:
    """Read sessions.jsonl; manifest paths are relative to its directory."""
    path = Path(path)
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            out.append(Session(d["id"], path.parent / d["adapt"], path.parent / d["test"],
                               d["num_adapt"], d["num_test"]))
    return out


TRANSCRIPT_FIELDS = ("text", "alignment")  # a word alignment spells the transcript too


def _without_text(cut: dict) -> dict:
    """The cut with no transcript (text or word alignment) left in any supervision."""
    cut = dict(cut)
    cut["supervisions"] = [{k: v for k, v in sup.items() if k not in TRANSCRIPT_FIELDS}
                           for sup in cut["supervisions"]]
    return cut


def _write_gz(path: Path, cuts: list[dict]) -> None:
    with atomic_path(path) as tmp, gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        for cut in cuts:
            f.write(json.dumps(cut, ensure_ascii=False) + "\n")


def split_sessions(cuts_path: Path, output_dir: Path, adapt_fraction: float = 0.7, seed: int = 0,
                   min_duration: float = 0.0, max_duration: float = math.inf) -> Path:
    """Write the layout above; return sessions.jsonl.

    A session needs one usable utterance in each part; one without is skipped,
    and the log says why.
    """
    if not 0.0 < adapt_fraction < 1.0:
        raise ValueError(f"adapt_fraction must be in (0, 1), got {adapt_fraction}")
    cuts_path, output_dir = Path(cuts_path), Path(output_dir)
    sessions_path = output_dir / "sessions.jsonl"
    done = output_dir / DONE_MARKER
    stamp = {"cuts": file_stamp(cuts_path), "adapt_fraction": adapt_fraction, "seed": seed,
             "min_duration": min_duration, "max_duration": str(max_duration)}
    if is_done(done, stamp, [sessions_path]):
        logger.info("Sessions of %s already in %s (%s exists): skipping", cuts_path, output_dir, done)
        return sessions_path
    done.unlink(missing_ok=True)
    for sub in ("adapt", "test", "truth"):
        shutil.rmtree(output_dir / sub, ignore_errors=True)
        (output_dir / sub).mkdir(parents=True)

    by_session: dict[str, list[dict]] = defaultdict(list)
    unusable: dict[str, int] = defaultdict(int)
    with gzip.open(cuts_path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            cut = json.loads(line)
            sups = cut.get("supervisions") or []
            speakers = {s.get("speaker") for s in sups}
            session = next(iter(speakers)) if len(speakers) == 1 else None
            if session is None:
                logger.warning("cut %s: %s, dropped", cut["id"], "no speaker" if not speakers else "several speakers")
            elif min_duration <= cut["duration"] <= max_duration:
                by_session[session].append(cut)
            else:
                unusable[session] += 1

    rows, truth, test_all = [], [], []
    for session in sorted(set(by_session) | set(unusable)):
        cuts = sorted(by_session.get(session, []), key=lambda c: c["id"])
        if len(cuts) < 2:
            logger.warning("session %s skipped: %d usable utterance(s) (%d outside %s-%s s); "
                           "it needs one to adapt on and one to test", session, len(cuts),
                           unusable[session], min_duration, max_duration)
            continue
        order = list(range(len(cuts)))
        random.Random(f"{seed}:{session}").shuffle(order)
        n_adapt = min(max(1, round(adapt_fraction * len(cuts))), len(cuts) - 1)
        adapt = [cuts[i] for i in sorted(order[:n_adapt])]
        test = [cuts[i] for i in sorted(order[n_adapt:])]
        name = safe_file_name(session)
        _write_gz(output_dir / "adapt" / f"{name}.jsonl.gz", [_without_text(c) for c in adapt])
        _write_gz(output_dir / "test" / f"{name}.jsonl.gz", test)
        test_all += test
        truth += [f"{c['id']} {' '.join(c['supervisions'][0].get('text', '').split())}\n" for c in adapt]
        rows.append({"id": session, "adapt": f"adapt/{name}.jsonl.gz", "test": f"test/{name}.jsonl.gz",
                     "num_adapt": len(adapt), "num_test": len(test),
                     "adapt_seconds": round(sum(c["duration"] for c in adapt), 3),
                     "test_seconds": round(sum(c["duration"] for c in test), 3)})
        logger.info("session %s: %d adaptation, %d test utterances", session, len(adapt), len(test))
    if not rows:
        raise ValueError(f"{cuts_path}: no session has two usable utterances; nothing to adapt on")
    _write_gz(output_dir / "test.jsonl.gz", test_all)
    with atomic_path(output_dir / "truth" / "adapt_text") as tmp:
        tmp.write_text("".join(truth), encoding="utf-8")
    with atomic_path(sessions_path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    logger.info("%d sessions -> %s", len(rows), sessions_path)
    mark_done(done, stamp)
    return sessions_path
