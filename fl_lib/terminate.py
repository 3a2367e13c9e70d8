"""SIGTERM as an exception: a scheduler's preemption or a `kill` unwinds a long job as an error would.

Every atomic write in progress removes its temporary file, process pools terminate their
workers on the way out (no orphans left decoding), and the command exits 143 with a
message instead of dying mid-write.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

EXIT_STATUS = 128 + signal.SIGTERM


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM. A BaseException, as KeyboardInterrupt: the handlers
    that count a client's error as a failed client must not swallow it."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated`; the previous handler comes back after it
    (a main() may run inside another program, as in the tests)."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
