"""Stage 2: each session's audio, split (seeded) into an adaptation part, a dev part and a test part.

The truth of the adaptation part is kept out of reach by the data layout, not by
discipline: the adaptation manifests are written with every supervision's text
removed, and the transcripts go to ``truth/adapt_text``, which only scoring (and the
oracle ablation, on request) opens. Which utterance adapts depends on the utterance
ids and the seed alone, so the adaptation manifests are the same bytes whatever the
transcripts say.

The parts are sentence-disjoint. The text decides only what the other utterances
may be used for: one whose sentence is in any session's adaptation part is scored
nowhere (dropped, counted in ``num_dropped`` and logged), and utterances of one
sentence go to the same part, dev or test, so within a session no sentence is in
two parts and no dev or test sentence is in any session's adaptation audio. A
corpus whose utterances all read distinct sentences (the embedded sessions,
``heldout_distinct_sentences``) loses nothing.

Layout under ``output_dir``::

    sessions.jsonl           one line per session: id, adapt/dev/test manifests and sizes
    adapt/<session>.jsonl.gz cuts without transcripts
    dev/<session>.jsonl.gz   cuts with transcripts: choosing settings
    test/<session>.jsonl.gz  cuts with transcripts: reporting, at the last stage
    dev.jsonl.gz             every session's dev cuts, decoded in one pass
    dropped.txt              ids of the utterances scored nowhere (their sentence is in an adaptation part)
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
PARTS = ("adapt", "dev", "test")


@dataclass(frozen=True)
class Session:
    """One session (client): its adaptation manifest (no transcripts), its dev and its test manifest."""

    id: str
    adapt: Path
    dev: Path
    test: Path
    num_adapt: int
    num_dev: int
    num_test: int


def load_sessions(path: Path) -> list[Session]:
    """Read sessions.jsonl; manifest paths are relative to its directory."""
    path = Path(path)
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            if "dev" not in d:
                raise ValueError(f"{path}: session {d.get('id')} has no dev part (split before dev parts "
                                 "existed): run stage 2 (split_sessions) again")
            out.append(Session(d["id"], *(path.parent / d[part] for part in PARTS),
                               *(d[f"num_{part}"] for part in PARTS)))
    return out


def sentence(cut: dict) -> str:
    """The words of a cut's transcript, case and spacing normalized: what "the same sentence" compares."""
    return " ".join(" ".join(sup.get("text") or "" for sup in cut["supervisions"]).upper().split())


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


def split_sessions(cuts_path: Path, output_dir: Path, adapt_fraction: float = 0.6, *, dev_fraction: float = 0.1,
                   seed: int = 0, min_duration: float = 0.0, max_duration: float = math.inf) -> Path:
    """Write the layout above; return sessions.jsonl.

    Each session's usable utterances are shuffled (seeded by ``seed`` and the session
    id); the first ``adapt_fraction`` of them adapt, and of the others, ``dev_fraction``
    of the session go to dev, sentence by sentence, and the rest to test. A session
    needs three usable utterances (one per part); one with fewer is skipped, and the
    log says why.
    """
    if not 0.0 < adapt_fraction < 1.0:
        raise ValueError(f"adapt_fraction must be in (0, 1), got {adapt_fraction}")
    if not 0.0 < dev_fraction < 1.0 or adapt_fraction + dev_fraction >= 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1) and leave a test part: adapt_fraction + dev_fraction "
                         f"< 1, got {adapt_fraction} + {dev_fraction}")
    cuts_path, output_dir = Path(cuts_path), Path(output_dir)
    sessions_path = output_dir / "sessions.jsonl"
    done = output_dir / DONE_MARKER
    stamp = {"cuts": file_stamp(cuts_path), "adapt_fraction": adapt_fraction, "dev_fraction": dev_fraction,
             "seed": seed, "min_duration": min_duration, "max_duration": str(max_duration)}
    if is_done(done, stamp, [sessions_path]):
        logger.info("Sessions of %s already in %s (%s exists): skipping", cuts_path, output_dir, done)
        return sessions_path
    done.unlink(missing_ok=True)
    for sub in (*PARTS, "truth"):
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

    # First the adaptation parts, from the ids and the seed alone; then the others, which need
    # every session's adaptation sentences.
    adapt_of, rest_of = {}, {}
    for session in sorted(set(by_session) | set(unusable)):
        cuts = sorted(by_session.get(session, []), key=lambda c: c["id"])
        if len(cuts) < len(PARTS):
            logger.warning("session %s skipped: %d usable utterance(s) (%d outside %s-%s s); "
                           "it needs one to adapt on, one for dev and one to test", session, len(cuts),
                           unusable[session], min_duration, max_duration)
            continue
        order = list(range(len(cuts)))
        random.Random(f"{seed}:{session}").shuffle(order)
        n_adapt = min(max(1, round(adapt_fraction * len(cuts))), len(cuts) - 2)
        adapt_of[session] = [cuts[i] for i in sorted(order[:n_adapt])]
        rest_of[session] = ([cuts[i] for i in order[n_adapt:]],
                            min(max(1, round(dev_fraction * len(cuts))), len(cuts) - n_adapt - 1))
    if not adapt_of:
        raise ValueError(f"{cuts_path}: no session has three usable utterances; nothing to adapt on")
    adapt_sentences = {sentence(c) for cuts in adapt_of.values() for c in cuts}

    rows, truth, dev_all, test_all, dropped_all = [], [], [], [], []
    for session, adapt in adapt_of.items():
        rest, n_dev = rest_of[session]
        dropped = [c for c in rest if sentence(c) in adapt_sentences]
        groups: dict[str, list[dict]] = {}  # sentence -> its cuts, in shuffled order
        for c in rest:
            if sentence(c) not in adapt_sentences:
                groups.setdefault(sentence(c), []).append(c)
        dev, test = [], []
        for i, group in enumerate(groups.values()):
            (dev if len(dev) < n_dev and i < len(groups) - 1 else test).extend(group)
        dev.sort(key=lambda c: c["id"])
        test.sort(key=lambda c: c["id"])
        if dropped:
            logger.warning("session %s: %d utterance(s) scored nowhere: their sentence is in an adaptation "
                           "part, e.g. %s", session, len(dropped), sorted(c["id"] for c in dropped)[:3])
        if not dev or not test:
            logger.warning("session %s: no %s utterance left; its adaptation part still adapts, but it is "
                           "not %s", session, "dev" if not dev else "test", "tuned on" if not dev else "scored")
        name = safe_file_name(session)
        _write_gz(output_dir / "adapt" / f"{name}.jsonl.gz", [_without_text(c) for c in adapt])
        _write_gz(output_dir / "dev" / f"{name}.jsonl.gz", dev)
        _write_gz(output_dir / "test" / f"{name}.jsonl.gz", test)
        dev_all += dev
        test_all += test
        dropped_all += sorted(c["id"] for c in dropped)
        truth += [f"{c['id']} {' '.join(c['supervisions'][0].get('text', '').split())}\n" for c in adapt]
        parts = {"adapt": adapt, "dev": dev, "test": test}
        rows.append({"id": session, **{part: f"{part}/{name}.jsonl.gz" for part in PARTS},
                     **{f"num_{part}": len(cuts) for part, cuts in parts.items()},
                     **{f"{part}_seconds": round(sum(c["duration"] for c in cuts), 3) for part, cuts in parts.items()},
                     "num_dropped": len(dropped)})
        logger.info("session %s: %d adaptation, %d dev, %d test utterances, %d dropped", session, len(adapt),
                    len(dev), len(test), len(dropped))
    if dropped_all:
        logger.warning("%d utterance(s) of %d sessions read a sentence of an adaptation part: scored nowhere "
                       "(listed in %s)", len(dropped_all), len(rows), output_dir / "dropped.txt")
    if not test_all:
        logger.warning("no session has a test utterance left: there is nothing to score")
    _write_gz(output_dir / "dev.jsonl.gz", dev_all)
    _write_gz(output_dir / "test.jsonl.gz", test_all)
    with atomic_path(output_dir / "dropped.txt") as tmp:
        tmp.write_text("".join(f"{u}\n" for u in dropped_all), encoding="utf-8")
    with atomic_path(output_dir / "truth" / "adapt_text") as tmp:
        tmp.write_text("".join(truth), encoding="utf-8")
    with atomic_path(sessions_path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    logger.info("%d sessions -> %s", len(rows), sessions_path)
    mark_done(done, stamp)
    return sessions_path
