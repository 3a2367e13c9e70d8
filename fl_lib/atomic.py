"""Atomic file writes: write a temporary file beside the target, then rename it over the target.

A reader, or a run killed mid-write, sees the old file or the new one, never half
of one. The temporary name holds the process id, so two processes writing the
same target (parallel decodes averaging one checkpoint) never share a temporary
file; it keeps the target's extensions, from which `np.savez` and Lhotse's
`to_file` pick the format. A writer that cleans up after itself on restart gives
its temporary files an `owner` tag and removes only `owned_temp_glob(owner)`:
another process may be writing into the same directory at that moment.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_path(path: Path, owner: str = "") -> Path:
    """Where `atomic_path` writes `path` before the rename."""
    path = Path(path)
    return path.with_name(f".tmp{os.getpid()}.{owner + '.' if owner else ''}{path.name}")


def owned_temp_glob(owner: str) -> str:
    """What a writer tagged `owner` leaves behind when it is killed before its rename."""
    if not owner:
        raise ValueError("an untagged temporary file may belong to any writer: give an owner")
    return f".tmp[0-9]*.{owner}.*"


@contextmanager
def atomic_path(path: Path, owner: str = "") -> Iterator[Path]:
    """Yield the temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    tmp = temp_path(path, owner)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def append_text(path: Path, text: str) -> None:
    """Append `text` to `path` whole or not at all: a write that fails part-way (ENOSPC,
    EIO) is cut back to the old end, so the file never ends in half a line.

    A `kill -9` between two writes can still leave a partial tail; readers that
    resume from the file drop an unparseable last line (`fl_lib.fl.server`).
    """
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except BaseException:
            os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)
