"""Done-markers of the data stages: a stage skips its work only when its marker
records exactly the inputs and settings of this run, so a changed input redoes
the stage instead of leaving stale output that looks current."""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path


def file_stamp(path: Path) -> dict:
    """Path, size and mtime of an input file: cheap, and any rewrite of the file changes it."""
    path = Path(path)
    st = path.stat()
    return {"path": str(path.absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def files_digest(paths: Iterable[Path]) -> str:
    """One hash of the stamps of many files, so that a marker stays small."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(json.dumps(file_stamp(path), sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def content_digest(path: Path) -> str:
    """Hash of a manifest's content, gunzipped: a gzip header holds a write time, so an
    identical re-run of a stage would otherwise look like other data."""
    import gzip

    path = Path(path)
    digest = hashlib.sha256()
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_done(marker: Path, stamp: dict, outputs: Iterable[Path]) -> bool:
    """True when ``marker`` holds ``stamp`` and every output exists; log why a stale marker is ignored."""
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:  # a run killed while writing it
        recorded = None
    if recorded != stamp:
        logging.info("%s was made from other inputs or settings: redoing the stage", marker)
        return False
    return all(Path(p).is_file() for p in outputs)


def mark_done(marker: Path, stamp: dict) -> None:
    """Write ``stamp`` to ``marker``; call it only after every output is complete."""
    marker.write_text(json.dumps(stamp, sort_keys=True), encoding="utf-8")
