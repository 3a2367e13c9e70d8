"""Stage 1: Lhotse manifests of a LibriSpeech-layout corpus, as icefall's prepare.sh makes them.

The corpus is scanned first (:mod:`fl_lib.data.corpus_check`). A clean subset goes
to lhotse's stock recipe as it is. A subset with bad inputs goes to it through a
filtered view (symlinks to the good audio and rewritten transcripts), because the
recipe crashes on some bad inputs and silently keeps others; the recording paths
are then pointed back at the real corpus and the view is removed.
"""
from __future__ import annotations

import gzip
import json
import logging
import shutil
from collections import Counter, defaultdict
from pathlib import Path

from fl_lib.data.corpus_check import (
    CorpusError,
    PartScan,
    audio_path,
    check_corpus_layout,
    scan_corpus,
    write_report,
)
from fl_lib.atomic import atomic_path
from fl_lib.data.markers import files_digest, is_done, mark_done

DONE_MARKER = ".prepare_manifests.done"
VIEW_DIR = "filtered_corpus"


def manifest_path(output_dir: Path, kind: str, part: str) -> Path:
    """Lhotse's naming: librispeech_{recordings,supervisions,cuts}_<part>.jsonl.gz."""
    return Path(output_dir) / f"librispeech_{kind}_{part}.jsonl.gz"


def prepare_manifests(corpus_dir: Path, output_dir: Path, nj: int = 1) -> dict[str, Path]:
    """Write recordings, supervisions and cuts manifests per subset; return {part: cuts path}.

    Skipped inputs are listed in ``output_dir/bad_inputs.jsonl``. A done-marker that
    names the corpus and stamps its files makes a re-run return at once; without it,
    or once the corpus changed, every part is redone.
    """
    corpus_dir = Path(corpus_dir).absolute()
    output_dir = Path(output_dir)
    parts = check_corpus_layout(corpus_dir)
    cuts = {part: manifest_path(output_dir, "cuts", part) for part in parts}
    done = output_dir / DONE_MARKER
    stamp = {"corpus_dir": str(corpus_dir), "parts": {part: corpus_stamp(corpus_dir / part) for part in parts}}
    if is_done(done, stamp, cuts.values()):
        logging.info("Manifests of %s already in %s (%s exists): skipping", corpus_dir, output_dir, done)
        return cuts

    output_dir.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    scans = scan_corpus(corpus_dir, nj)
    report = output_dir / "bad_inputs.jsonl"
    write_report(scans, report)
    for scan in scans.values():
        _check_usable(corpus_dir, scan, report)
    for part, scan in scans.items():
        for kind in ("recordings", "supervisions", "cuts"):
            manifest_path(output_dir, kind, part).unlink(missing_ok=True)  # lhotse would reuse stale ones
        _run_lhotse(corpus_dir, scan, output_dir, nj)
        _write_cuts(output_dir, part)
    mark_done(done, stamp)
    return cuts


def corpus_stamp(part_dir: Path) -> str:
    """Hash of (path, size, mtime) of every transcript and audio file of a part.

    A stat per file, no reads: cheap next to stage 1 itself, and a re-synthesized
    corpus or an in-place edit changes it, so stale manifests are never reused.
    """
    return files_digest(sorted(p for pattern in ("*.trans.txt", "*.flac") for p in part_dir.rglob(pattern)))


def _check_usable(corpus_dir: Path, scan: PartScan, report: Path) -> None:
    """Stop before lhotse when a part has no usable utterance: its recipe would fail an assertion."""
    if not scan.good:
        counts = dict(sorted(Counter(bad.problem for bad in scan.bad).items()))
        raise CorpusError(
            f"{corpus_dir / scan.part}: no usable utterance ({len(scan.bad)} skipped inputs: {counts}; "
            f"details in {report}). Fix the inputs or remove the part."
        )


def _run_lhotse(corpus_dir: Path, scan: PartScan, output_dir: Path, nj: int) -> None:
    """Run lhotse's recipe on one part, through a filtered view when the scan skipped anything."""
    from lhotse.recipes import prepare_librispeech

    if not scan.bad:
        prepare_librispeech(corpus_dir, dataset_parts=[scan.part], output_dir=output_dir, num_jobs=nj)
        return
    view = (output_dir / VIEW_DIR).absolute()
    shutil.rmtree(view / scan.part, ignore_errors=True)
    _build_view(corpus_dir, scan, view)
    prepare_librispeech(view, dataset_parts=[scan.part], output_dir=output_dir, num_jobs=nj)
    _rebase_recordings(manifest_path(output_dir, "recordings", scan.part), view, corpus_dir)
    shutil.rmtree(view)


def _build_view(corpus_dir: Path, scan: PartScan, view: Path) -> None:
    """Symlink the good audio of ``scan.part`` under ``view`` and write transcripts of only those."""
    by_dir: dict[Path, list[str]] = defaultdict(list)
    for utt_id in sorted(scan.good):
        src = audio_path(corpus_dir / scan.part, utt_id)
        rel = src.relative_to(corpus_dir)
        (view / rel).parent.mkdir(parents=True, exist_ok=True)
        (view / rel).symlink_to(src)
        by_dir[(view / rel).parent].append(f"{utt_id} {scan.good[utt_id]}\n")
    for chapter_dir, lines in by_dir.items():
        name = "-".join(chapter_dir.relative_to(view / scan.part).parts)
        (chapter_dir / f"{name}.trans.txt").write_text("".join(lines), encoding="utf-8")


def _rebase_recordings(path: Path, view: Path, corpus_dir: Path) -> None:
    """Point recording sources inside the filtered view back at the real corpus files."""
    prefix = str(view)
    with (
        atomic_path(path) as tmp,
        gzip.open(path, "rt", encoding="utf-8") as src,
        gzip.open(tmp, "wt", encoding="utf-8") as dst,
    ):
        for line in src:
            rec = json.loads(line)
            for source in rec["sources"]:
                if source["source"].startswith(prefix):
                    source["source"] = str(corpus_dir) + source["source"][len(prefix):]
            dst.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _write_cuts(output_dir: Path, part: str) -> None:
    """One cut per recording with its supervision, as icefall's compute_fbank step builds them."""
    from lhotse import CutSet, load_manifest_lazy

    path = manifest_path(output_dir, "cuts", part)
    recordings = load_manifest_lazy(manifest_path(output_dir, "recordings", part))
    supervisions = load_manifest_lazy(manifest_path(output_dir, "supervisions", part))
    cuts = CutSet.from_manifests(recordings=recordings.to_eager(), supervisions=supervisions.to_eager())
    with atomic_path(path) as tmp:
        cuts.to_file(tmp)
    logging.info("%s: %d cuts -> %s", part, len(cuts), path)
