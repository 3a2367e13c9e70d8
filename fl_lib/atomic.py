"""Atomic file writes: write a temporary file beside the target, then rename it over the target.

A reader, or a run killed mid-write, sees the old file or the new one, never half
of one. The temporary name holds the process id, so two processes writing the
same target (parallel decodes averaging one checkpoint) never share a temporary
file; it keeps the target's extensions, from which `np.savez` and Lhotse's
`to_file` pick the format.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_GLOB = ".tmp[0-9]*.*"  # what a writer killed before its rename leaves behind


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield the temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
