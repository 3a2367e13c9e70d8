"""Stage 2: one federated client per speaker, and length-filtered dev/test sets.

Lhotse has no split-by-speaker, and one ``filter()`` per speaker would read the
corpus once per speaker. Here a single streaming pass reads the cuts manifest as
raw JSON lines and appends each line unchanged to its speaker's manifest, so no
Cut objects are built and memory stays bounded whatever the corpus size.
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import re
import shutil
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from hashlib import sha1
from pathlib import Path

from fl_lib.atomic import atomic_path
from fl_lib.data.markers import file_stamp, is_done, mark_done

DONE_MARKER = ".split_clients.done"
GZIP_LEVEL = 1  # speed over size: client manifests are small and written once


@dataclass(frozen=True)
class ClientInfo:
    """One federated client: a speaker and its cuts manifest."""

    id: str
    num_cuts: int
    duration: float
    manifest: Path


class _SpeakerWriters:
    """Bounded LRU of per-speaker pending lines, flushed as appended gzip members.

    Holding a few pending lines per speaker costs far less memory than an open
    gzip compressor (hundreds of KiB each), so many more speakers fit in the LRU
    and fewer appends happen. An evicted speaker's file is appended to later, which
    yields a multi-member gzip file; gzip readers (and lhotse) read those whole.
    Memory is bounded by ``max_pending_bytes`` plus one line.
    """

    def __init__(self, out_dir: Path, lru_size: int, max_pending_bytes: int) -> None:
        self.out_dir = out_dir
        self.lru_size = lru_size
        self.max_pending_bytes = max_pending_bytes
        self.pending: OrderedDict[str, bytearray] = OrderedDict()
        self.pending_bytes = 0

    def path(self, speaker: str) -> Path:
        return self.out_dir / f"{safe_file_name(speaker)}.jsonl.gz"

    def write(self, speaker: str, line: bytes) -> None:
        buf = self.pending.get(speaker)
        if buf is None:
            self.pending[speaker] = bytearray(line)
        else:
            buf += line
            self.pending.move_to_end(speaker)
        self.pending_bytes += len(line)
        while len(self.pending) > self.lru_size or self.pending_bytes > self.max_pending_bytes:
            self._flush(*self.pending.popitem(last=False))

    def close(self) -> None:
        while self.pending:
            self._flush(*self.pending.popitem(last=False))

    def _flush(self, speaker: str, data: bytearray) -> None:
        self.pending_bytes -= len(data)
        # wbits=31: one complete gzip member. A small memLevel makes the many tiny
        # members of an interleaved input several times cheaper to start.
        gz = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31, memLevel=2)
        member = gz.compress(data) + gz.flush()
        with open(self.path(speaker), "ab") as f:
            f.write(member)


def safe_file_name(speaker: str) -> str:
    """The speaker id if it is a safe file name, else a sanitized name with a hash suffix."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", speaker):
        return speaker
    return re.sub(r"[^A-Za-z0-9._-]", "_", speaker) + "-" + sha1(speaker.encode()).hexdigest()[:8]


def _lines(paths: Sequence[Path]) -> Iterator[bytes]:
    """The raw lines of several gzipped jsonl manifests, in order, one file open at a time."""
    for path in paths:
        with gzip.open(path, "rb") as f:
            yield from f


def _with_newline(line: bytes) -> bytes:
    return line if line.endswith(b"\n") else line + b"\n"


def _speakers(cut: dict) -> set[str | None]:
    """The distinct speakers of a cut's supervisions; None stands for a supervision without one."""
    return {sup.get("speaker") or None for sup in cut.get("supervisions") or []}


def _log_drops(what: str, kept: int, drops: Counter) -> None:
    if drops:
        logging.warning("%s: kept %d cuts, dropped %s", what, kept, dict(sorted(drops.items())))
    else:
        logging.info("%s: kept %d cuts, dropped none", what, kept)


def split_clients(
    cuts_paths: Path | Sequence[Path],
    output_dir: Path,
    min_utts: int = 1,
    min_duration: float = 0.0,
    max_duration: float = math.inf,
    lru_size: int = 1 << 18,
    max_pending_bytes: int = 256 << 20,
) -> Path:
    """Write ``output_dir/cuts/<speaker>.jsonl.gz`` and ``output_dir/clients.jsonl``; return the latter.

    Several cuts manifests (LibriSpeech's 960 h = three training parts) are read
    one after the other in the same streaming pass and make one federation.
    Cuts outside [min_duration, max_duration], without a speaker or with several
    speakers (no one client owns them) are dropped, then clients with fewer than
    ``min_utts`` cuts; each drop is counted in the log.
    """
    cuts_paths = [Path(cuts_paths)] if isinstance(cuts_paths, (str, Path)) else [Path(p) for p in cuts_paths]
    if not cuts_paths:
        raise ValueError("split_clients needs at least one cuts manifest")
    output_dir = Path(output_dir)
    clients_path = output_dir / "clients.jsonl"
    done = output_dir / DONE_MARKER
    stamp = {
        "cuts": [file_stamp(p) for p in cuts_paths],
        "min_utts": min_utts,
        "min_duration": min_duration,
        "max_duration": str(max_duration),
    }
    names = ", ".join(str(p) for p in cuts_paths)
    if is_done(done, stamp, [clients_path]):
        logging.info("Clients of %s already in %s (%s exists): skipping", names, output_dir, done)
        return clients_path

    done.unlink(missing_ok=True)
    cuts_dir = output_dir / "cuts"
    shutil.rmtree(cuts_dir, ignore_errors=True)  # appends below must start from empty files
    cuts_dir.mkdir(parents=True)
    writers = _SpeakerWriters(cuts_dir, lru_size, max_pending_bytes)
    stats: dict[str, list] = {}  # speaker -> [num_cuts, duration]
    drops: Counter = Counter()
    kept = 0
    for line in _lines(cuts_paths):
        if line.strip():
            cut = json.loads(line)
            speakers = _speakers(cut)
            duration = cut["duration"]
            if not speakers or None in speakers:
                drops["no supervision or speaker"] += 1
            elif len(speakers) > 1:
                drops["several speakers"] += 1
            elif duration < min_duration:
                drops[f"shorter than {min_duration} s"] += 1
            elif duration > max_duration:
                drops[f"longer than {max_duration} s"] += 1
            else:
                (speaker,) = speakers
                writers.write(speaker, _with_newline(line))
                entry = stats.setdefault(speaker, [0, 0.0])
                entry[0] += 1
                entry[1] += duration
                kept += 1
    writers.close()
    _log_drops(f"split_clients {names}", kept, drops)

    few = sorted(s for s, (n, _) in stats.items() if n < min_utts)
    for speaker in few:
        writers.path(speaker).unlink()
    if few:
        logging.warning(
            "Dropped %d clients with fewer than %d utterances (%d cuts): %s%s",
            len(few), min_utts, sum(stats[s][0] for s in few), few[:10], " ..." if len(few) > 10 else "",
        )
    with atomic_path(clients_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for speaker in sorted(set(stats) - set(few)):
            n, dur = stats[speaker]
            rel = writers.path(speaker).relative_to(output_dir)
            f.write(json.dumps({"id": speaker, "num_cuts": n, "duration": round(dur, 3), "manifest": str(rel)}) + "\n")
    logging.info("%d clients, %d cuts -> %s", len(stats) - len(few), kept - sum(stats[s][0] for s in few), clients_path)
    mark_done(done, stamp)
    return clients_path


def load_clients(path: Path) -> list[ClientInfo]:
    """Read clients.jsonl; relative manifest paths are resolved against its directory."""
    path = Path(path)
    clients = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    d = json.loads(line)
                    clients.append(ClientInfo(d["id"], int(d["num_cuts"]), float(d["duration"]), path.parent / d["manifest"]))
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno} is not a client record (id, num_cuts, duration, manifest): "
                                     f"{type(e).__name__}: {e}") from None
    return clients


def filter_cuts(
    cuts_path: Path, output_path: Path, min_duration: float = 0.0, max_duration: float = math.inf
) -> Path:
    """Copy the cuts within [min_duration, max_duration] that have a supervision; log what was dropped.

    ``<output_path>.done`` records the input and the limits, so a re-run with both
    unchanged returns at once and any change redoes the copy.
    """
    cuts_path, output_path = Path(cuts_path), Path(output_path)
    done = output_path.with_name(output_path.name + ".done")
    stamp = {"cuts": file_stamp(cuts_path), "min_duration": min_duration, "max_duration": str(max_duration)}
    if is_done(done, stamp, [output_path]):
        logging.info("%s already filtered into %s (%s exists): skipping", cuts_path, output_path, done)
        return output_path
    output_path.parent.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    drops: Counter = Counter()
    kept = 0
    with (
        atomic_path(output_path) as tmp,
        gzip.open(cuts_path, "rb") as src,
        gzip.open(tmp, "wb", compresslevel=GZIP_LEVEL) as dst,
    ):
        for line in src:
            if not line.strip():
                continue
            cut = json.loads(line)
            if not cut.get("supervisions"):
                drops["no supervision"] += 1
            elif cut["duration"] < min_duration:
                drops[f"shorter than {min_duration} s"] += 1
            elif cut["duration"] > max_duration:
                drops[f"longer than {max_duration} s"] += 1
            else:
                dst.write(_with_newline(line))
                kept += 1
    _log_drops(f"filter_cuts {cuts_path} -> {output_path}", kept, drops)
    mark_done(done, stamp)
    return output_path
