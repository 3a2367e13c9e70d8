"""Validate a LibriSpeech-layout corpus before Lhotse sees it.

Lhotse's LibriSpeech recipe crashes on corrupt audio, empty transcripts and
non-UTF-8 transcripts, ignores audio that no transcript names, and silently
accepts audio at the wrong sample rate, with several channels, or truncated
after a valid header. This module finds all of those first,
so that stage 1 either stops with a message naming the file, or skips the
utterance and reports it (nothing disappears silently).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import soundfile as sf
from tqdm.auto import tqdm

# The subset names lhotse's recipe detects with dataset_parts="auto".
LIBRISPEECH_PARTS = (
    "dev-clean",
    "dev-other",
    "test-clean",
    "test-other",
    "train-clean-100",
    "train-clean-360",
    "train-other-500",
    "dev-clean-2",
    "train-clean-5",
)
SAMPLE_RATE = 16000
UNKNOWN_FRAMES = 2**63 - 1  # libsndfile reports this when a header has no length
MAX_WARNINGS_PER_KIND = 20  # the rest are in bad_inputs.jsonl
TAIL_SECONDS = 0.1  # read at the end of each file to detect truncation


class CorpusError(Exception):
    """The corpus cannot be used at all; the message names the path and the problem."""


class CorpusLayoutError(CorpusError):
    """The corpus directory is missing or holds no LibriSpeech subset."""


class TranscriptEncodingError(CorpusError):
    """A trans.txt file is not valid UTF-8."""


@dataclass(frozen=True)
class BadInput:
    """One skipped item, as written to bad_inputs.jsonl."""

    part: str
    file: str
    utt_id: str | None
    problem: str
    detail: str = ""


@dataclass
class PartScan:
    """Result of scanning one subset: usable utterances and skipped items."""

    part: str
    good: dict[str, str] = field(default_factory=dict)  # utt id -> transcript text
    bad: list[BadInput] = field(default_factory=list)


def check_corpus_layout(corpus_dir: Path) -> list[str]:
    """Return the LibriSpeech subsets found in ``corpus_dir``; raise CorpusLayoutError if none."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise CorpusLayoutError(
            f"Corpus directory {corpus_dir} does not exist (expected the LibriSpeech root "
            f"that holds subset directories such as train-clean-100/, dev-clean/)."
        )
    parts = sorted(p.name for p in corpus_dir.iterdir() if p.is_dir() and p.name in LIBRISPEECH_PARTS)
    if not parts:
        found = sorted(p.name for p in corpus_dir.iterdir())[:10]
        if (corpus_dir / "LibriSpeech").is_dir():
            found.append(f"did you mean {corpus_dir / 'LibriSpeech'}?")
        raise CorpusLayoutError(
            f"No LibriSpeech subset directory in {corpus_dir} (expected one of "
            f"{', '.join(LIBRISPEECH_PARTS)}; found: {found or 'nothing'}). "
            f"Pass the directory that holds the subsets, e.g. .../LibriSpeech."
        )
    for part in parts:
        _check_part_layout(corpus_dir / part)
    return parts


def _check_part_layout(part_dir: Path) -> None:
    """Raise CorpusLayoutError unless some SPK/CHAP/ holds SPK-CHAP.trans.txt and a SPK-CHAP-NNNN.flac.

    Stops at the first such chapter, so a good part costs a few directory listings;
    lhotse's recipe would otherwise find nothing, or fail, without saying why.
    """
    for speaker in (d for d in part_dir.iterdir() if d.is_dir()):
        for chapter in (d for d in speaker.iterdir() if d.is_dir()):
            name = f"{speaker.name}-{chapter.name}"
            if (chapter / f"{name}.trans.txt").is_file() and next(chapter.glob(f"{name}-*.flac"), None):
                return
    flac = next(part_dir.rglob("*.flac"), None)
    trans = next(part_dir.rglob("*.trans.txt"), None)
    if flac is None and trans is None:
        problem = "holds no .flac or .trans.txt file"
    elif flac is None:
        problem = f"holds no .flac file next to its transcripts (e.g. {trans.relative_to(part_dir)})"
    elif trans is None:
        problem = f"holds no SPEAKER-CHAPTER.trans.txt transcript (audio e.g. {flac.relative_to(part_dir)})"
    else:
        problem = (f"flac files not in SPEAKER/CHAPTER dirs next to a matching transcript "
                   f"(e.g. {flac.relative_to(part_dir)}, {trans.relative_to(part_dir)})")
    raise CorpusLayoutError(
        f"{part_dir} {problem}; expected SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt and "
        f"SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.flac as in LibriSpeech."
    )


def audio_path(part_dir: Path, utt_id: str) -> Path:
    """Where lhotse's recipe looks for an utterance: SPK-CHAP-NNNN -> SPK/CHAP/SPK-CHAP-NNNN.flac."""
    return part_dir / Path(utt_id.replace("-", "/")).parent / f"{utt_id}.flac"


def read_transcript(path: Path) -> list[tuple[int, str]]:
    """(line number, decoded line) pairs; stop on the first byte that is not UTF-8."""
    lines = []
    offset = 0
    for lineno, raw in enumerate(path.read_bytes().splitlines(keepends=True), start=1):
        try:
            lines.append((lineno, raw.decode("utf-8")))
        except UnicodeDecodeError as err:
            raise TranscriptEncodingError(
                f"{path}: line {lineno} (byte offset {offset + err.start}) is not UTF-8: "
                f"{raw[err.start:err.start + 4]!r}. Re-encode the transcript as UTF-8."
            ) from err
        offset += len(raw)
    return lines


def _audio_problem(path: Path) -> tuple[str, str] | None:
    """(problem, detail) when an audio file cannot be used, else None. Reads the header and the last frames."""
    try:
        with sf.SoundFile(str(path)) as f:
            return _header_problem(f) or _tail_problem(f)
    except sf.LibsndfileError as err:
        return "corrupt_audio", str(err)


def _header_problem(f: sf.SoundFile) -> tuple[str, str] | None:
    """What the header alone shows: no samples, another sample rate, several channels."""
    if not 0 < f.frames < UNKNOWN_FRAMES:
        return "empty_audio", "the header gives no samples (an empty FLAC, or a streamed one: re-encode it)"
    if f.samplerate != SAMPLE_RATE:
        return "wrong_sample_rate", f"{f.samplerate} Hz, expected {SAMPLE_RATE} Hz"
    if f.channels != 1:
        return "not_mono", f"{f.channels} channels, expected 1"
    return None


def _tail_problem(f: sf.SoundFile) -> tuple[str, str] | None:
    """A truncated file keeps a valid header; only reading its end shows that samples are missing."""
    tail = min(f.frames, int(TAIL_SECONDS * f.samplerate))
    try:
        f.seek(f.frames - tail)
        read = len(f.read(tail))
    except sf.LibsndfileError as err:
        return "truncated_audio", f"the last {tail} of the {f.frames} samples its header gives are unreadable ({err})"
    if read < tail:
        return "truncated_audio", f"only {read} of the last {tail} of the {f.frames} samples its header gives"
    return None


def scan_part(corpus_dir: Path, part: str, nj: int = 1) -> PartScan:
    """Scan one subset's transcripts and audio headers; see the module docstring."""
    part_dir = Path(corpus_dir) / part
    scan = PartScan(part)
    candidates: dict[str, tuple[Path, str]] = {}  # utt id -> (audio, text)
    flacs = {p for p in part_dir.rglob("*.flac")}
    for trans in sorted(part_dir.rglob("*.trans.txt")):
        for lineno, line in read_transcript(trans):
            fields = line.strip().split(maxsplit=1)
            where = f"{trans}:{lineno}"
            if not fields:
                scan.bad.append(BadInput(part, where, None, "blank_line"))
                continue
            utt_id = fields[0]
            text = fields[1].strip() if len(fields) > 1 else ""
            audio = audio_path(part_dir, utt_id)
            if utt_id in candidates:
                scan.bad.append(BadInput(part, where, utt_id, "duplicate_utt_id"))
            elif not text:
                scan.bad.append(BadInput(part, where, utt_id, "empty_transcript"))
            elif audio not in flacs:
                scan.bad.append(BadInput(part, str(audio), utt_id, "missing_audio", f"named in {where}"))
            else:
                candidates[utt_id] = (audio, text)
    named = {audio for audio, _ in candidates.values()} | {
        audio_path(part_dir, b.utt_id) for b in scan.bad if b.utt_id is not None
    }
    for flac in sorted(flacs - named):
        scan.bad.append(BadInput(part, str(flac), flac.name.removesuffix(".flac"), "no_transcript"))

    ids = sorted(candidates)
    with ThreadPoolExecutor(max(1, nj)) as pool:
        problems = pool.map(lambda u: _audio_problem(candidates[u][0]), ids)
        for utt_id, problem in tqdm(zip(ids, problems), total=len(ids), desc=f"Checking {part}", leave=False):
            if problem is None:
                scan.good[utt_id] = candidates[utt_id][1]
            else:
                scan.bad.append(BadInput(part, str(candidates[utt_id][0]), utt_id, *problem))
    return scan


def scan_corpus(corpus_dir: Path, nj: int = 1) -> dict[str, PartScan]:
    """Scan every subset found by :func:`check_corpus_layout`."""
    return {part: scan_part(corpus_dir, part, nj) for part in check_corpus_layout(corpus_dir)}


def write_report(scans: dict[str, PartScan], path: Path) -> Counter:
    """Write one JSON line per skipped item to ``path``, warn per item, log counts per kind."""
    counts: Counter = Counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for scan in scans.values():
            for bad in scan.bad:
                counts[bad.problem] += 1
                f.write(json.dumps(asdict(bad), ensure_ascii=False) + "\n")
                if counts[bad.problem] <= MAX_WARNINGS_PER_KIND:
                    logging.warning("Skipping %s: %s %s [%s, utt %s]", bad.file, bad.problem, bad.detail, bad.part, bad.utt_id)
    for scan in scans.values():
        logging.info("%s: %d usable utterances, %d skipped", scan.part, len(scan.good), len(scan.bad))
    if counts:
        logging.warning("Skipped inputs by kind: %s (details: %s)", dict(sorted(counts.items())), path)
    return counts
