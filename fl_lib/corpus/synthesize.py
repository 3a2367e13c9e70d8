"""Stage 0: synthesize the embedded corpus in LibriSpeech's exact on-disk layout.

Everything random (speakers, their preferences, counts, sentences) is drawn up
front from the seed, so the audio rendering, which runs in a pool, cannot
change the result: the same seed gives byte-identical transcripts and audio.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from fl_lib.corpus.grammar import CATEGORIES, distinct_sentences, lm_sentences, sample_sentence
from fl_lib.corpus.voices import Speaker, check_tools, festival_script, postprocess, run_tool, synth_command

logger = logging.getLogger(__name__)

TRAIN, DEV, TEST, HELDOUT = "train-clean-100", "dev-clean", "test-clean", "test-other"
SUBSETS = (TRAIN, DEV, TEST, HELDOUT)
LM_TEXT = "librispeech-lm-norm.txt"  # the name of LibriSpeech's LM corpus (openslr 11), uncompressed
BATCH_SIZE = {"festival": 64, "flite": 16, "espeak": 16}  # utterances per pool task; a festival batch is one process


@dataclass(frozen=True)
class CorpusConfig:
    """What the embedded corpus contains. Ranges are inclusive [low, high]."""

    seed: int = 1234
    num_train_speakers: int = 16
    num_heldout_speakers: int = 4
    # Voice bases, cycled over speakers. Held-out speakers on a base also used for
    # training get a pitch shift outside the training range (heldout_pitch_range).
    train_voices: tuple[str, ...] = (
        "flite:slt", "flite:rms", "flite:awb", "flite:kal16", "festival:kal_diphone",
        "festival:cmu_us_slt_arctic_hts", "espeak:en-us+f3", "espeak:en+m3",
    )
    heldout_voices: tuple[str, ...] = ("festival:ked_diphone", "flite:slt", "espeak:en-us+f5", "flite:rms")
    train_utts: tuple[int, int] = (25, 130)
    dev_utts: tuple[int, int] = (5, 8)
    test_utts: tuple[int, int] = (5, 8)
    heldout_utts: tuple[int, int] = (25, 40)
    pitch_range: tuple[float, float] = (-2.0, 2.0)  # semitones
    rate_range: tuple[float, float] = (0.9, 1.15)
    heldout_pitch_range: tuple[float, float] = (2.5, 4.0)  # |semitones|, outside pitch_range
    category_alpha: float = 0.5  # Dirichlet concentration of per-speaker grammar preferences
    eval_fraction: float = 0.2  # share of sentence space reserved for dev (half) and test (half)
    lm_sentences: int = 10000  # sentences of LM text (LM_TEXT), from the training share of sentence space
    # True: no two held-out (test-other) utterances read the same sentence, so however a
    # session's utterances are split (adaptation, dev, test), no sentence is in two parts.
    heldout_distinct_sentences: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):  # YAML gives lists; keep the config hashable and comparable
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        for name in ("train_utts", "dev_utts", "test_utts", "heldout_utts", "pitch_range", "rate_range",
                     "heldout_pitch_range"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: low {low} > high {high}")
        if self.num_train_speakers < 1 or not self.train_voices:
            raise ValueError("need at least one training speaker and one training voice")
        if self.num_heldout_speakers and not self.heldout_voices:
            raise ValueError("held-out speakers need heldout_voices")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.lm_sentences < 0:
            raise ValueError(f"lm_sentences must be >= 0, got {self.lm_sentences}")
        if not isinstance(self.heldout_distinct_sentences, bool):
            raise ValueError(f"heldout_distinct_sentences must be true or false, "
                             f"got {self.heldout_distinct_sentences!r}")

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> "CorpusConfig":
        """Load a YAML config; unknown keys are an error, not silently ignored."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown corpus config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def tiny(cls, seed: int = 0) -> "CorpusConfig":
        """A few-second corpus for tests, touching every engine (flite, festival, espeak)."""
        return cls(
            seed=seed, num_train_speakers=4, num_heldout_speakers=2,
            train_voices=("flite:slt", "flite:rms", "festival:kal_diphone", "espeak:en-us+f3"),
            heldout_voices=("festival:ked_diphone", "flite:slt"),
            train_utts=(6, 10), dev_utts=(2, 2), test_utts=(2, 2), heldout_utts=(3, 3), lm_sentences=300,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-shaped (lists, not tuples) so it compares equal to what .done holds.

        Keys added after corpora were synthesized appear only when set (ADDED_KEYS): a corpus
        made before they existed keeps matching its config."""
        data = json.loads(json.dumps(asdict(self)))
        for name, default in ADDED_KEYS.items():
            if data[name] == default:
                del data[name]
        return data


ADDED_KEYS = {"heldout_distinct_sentences": False}  # key: the default, which to_dict leaves out


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    subset: str
    speaker: Speaker
    text: str

    def path(self, root: Path, suffix: str = ".flac") -> Path:
        speaker, chapter, _ = self.utt_id.split("-")
        return root / self.subset / speaker / chapter / f"{self.utt_id}{suffix}"


def _dirichlet(rng: random.Random, alpha: float, keys: list[str]) -> dict[str, float]:
    draws = [rng.gammavariate(alpha, 1.0) for _ in keys]
    total = sum(draws)
    return {k: round(d / total, 4) for k, d in zip(keys, draws)}


def make_speakers(config: CorpusConfig) -> list[Speaker]:
    """Training speakers 1001.., held-out speakers 2001..; perturbations spread per voice base."""
    rng = random.Random(f"{config.seed}:speakers")
    categories = list(CATEGORIES)
    speakers = []
    n_bases = len(config.train_voices)
    for i in range(config.num_train_speakers):
        base = config.train_voices[i % n_bases]
        # Speakers sharing a base take different pitch strata, so they stay distinguishable.
        occurrence = i // n_bases
        n_occ = len(range(i % n_bases, config.num_train_speakers, n_bases))
        low, high = config.pitch_range
        pitch = low + (occurrence + rng.random()) / n_occ * (high - low)
        rate = rng.uniform(*config.rate_range)
        speakers.append(Speaker(1001 + i, base, round(pitch, 2), round(rate, 3), False,
                                _dirichlet(rng, config.category_alpha, categories)))
    for j in range(config.num_heldout_speakers):
        base = config.heldout_voices[j % len(config.heldout_voices)]
        if base in config.train_voices:  # seen voice: unseen perturbation
            pitch = rng.choice((-1, 1)) * rng.uniform(*config.heldout_pitch_range)
        else:
            pitch = rng.uniform(*config.pitch_range)
        rate = rng.uniform(*config.rate_range)
        speakers.append(Speaker(2001 + j, base, round(pitch, 2), round(rate, 3), True,
                                _dirichlet(rng, config.category_alpha, categories)))
    return speakers


def make_plan(config: CorpusConfig, speakers: list[Speaker]) -> list[Utterance]:
    """Every utterance's id and text. Training speakers read train sentences in
    train-clean-100 and eval sentences in dev/test-clean; held-out speakers read
    test sentences in test-other, so test-clean vs test-other isolates the voice.
    With heldout_distinct_sentences, the held-out utterances read distinct sentences."""
    plan = []
    categories = list(CATEGORIES)
    used: set[str] = set()  # held-out sentences so far (heldout_distinct_sentences)
    exhausted: set[str] = set()  # categories with no unused held-out sentence left
    for speaker in speakers:
        rng = random.Random(f"{config.seed}:text:{speaker.speaker_id}")
        weights = [speaker.category_prefs[c] for c in categories]
        if speaker.heldout:
            parts = [(HELDOUT, "test", config.heldout_utts)]
        else:
            parts = [(TRAIN, "train", config.train_utts), (DEV, "dev", config.dev_utts),
                     (TEST, "test", config.test_utts)]
        for subset, partition, (low, high) in parts:
            chapter = speaker.speaker_id * 10 + SUBSETS.index(subset)
            count = rng.randint(low, high)
            if speaker.heldout and config.heldout_distinct_sentences:
                texts = distinct_sentences(rng, speaker.category_prefs, count, partition, config.eval_fraction,
                                           used, exhausted)
            else:
                texts = [sample_sentence(rng, rng.choices(categories, weights=weights)[0], partition,
                                         config.eval_fraction) for _ in range(count)]
            for n, text in enumerate(texts):
                plan.append(Utterance(f"{speaker.speaker_id}-{chapter}-{n:04d}", subset, speaker, text))
    return plan


def _render_batch(batch: list[Utterance], root: Path, tmp: Path) -> dict[str, float]:
    """Render a batch to FLAC; returns {utt_id: seconds}."""
    raws = {u.utt_id: tmp / f"{u.utt_id}.wav" for u in batch}
    if batch[0].speaker.voice.engine == "festival":
        script = tmp / f"{batch[0].utt_id}.scm"
        script.write_text(festival_script(batch[0].speaker.voice, [(u.text, raws[u.utt_id]) for u in batch]))
        run_tool(["festival", "--batch", str(script)])
        script.unlink()
    else:
        for u in batch:
            run_tool(synth_command(u.speaker, u.text, raws[u.utt_id]))
    durations = {}
    for u in batch:
        durations[u.utt_id] = postprocess(u.speaker, raws[u.utt_id], u.path(root))
        raws[u.utt_id].unlink()
    return durations


def _batches(plan: list[Utterance]) -> list[list[Utterance]]:
    """Batches of one voice base each; festival first, as its batches are the longest tasks."""
    by_base: dict[str, list[Utterance]] = defaultdict(list)
    for u in plan:
        by_base[u.speaker.base].append(u)
    batches = [utts[i:i + size] for utts in by_base.values()
               for size in [BATCH_SIZE[utts[0].speaker.voice.engine]] for i in range(0, len(utts), size)]
    return sorted(batches, key=lambda b: b[0].speaker.voice.engine != "festival")


def _write_transcripts(root: Path, plan: list[Utterance]) -> None:
    chapters: dict[Path, list[Utterance]] = defaultdict(list)
    for u in plan:
        chapters[u.path(root).parent].append(u)
    for chapter_dir, utts in chapters.items():
        name = f"{chapter_dir.parent.name}-{chapter_dir.name}.trans.txt"
        lines = sorted(f"{u.utt_id} {u.text}\n" for u in utts)
        (chapter_dir / name).write_text("".join(lines))


def _write_speakers(root: Path, config: CorpusConfig, speakers: list[Speaker], plan: list[Utterance],
                    durations: dict[str, float]) -> None:
    """SPEAKERS.TXT in LibriSpeech's format, and speakers.json with the full voice recipe."""
    seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for u in plan:
        seconds[u.speaker.speaker_id][u.subset] += durations[u.utt_id]
        counts[u.speaker.speaker_id][u.subset] += 1
    lines = [
        f"; Pseudo-speakers of the embedded corpus (fl_lib.corpus, seed {config.seed}): synthetic voices,\n",
        "; NAME is the voice recipe: TTS voice base, pitch shift (semitones), speaking-rate factor.\n",
        "; train-clean-100 speakers also read dev-clean and test-clean (sentences unseen in training);\n",
        "; test-other holds held-out speakers only. Full parameters: speakers.json\n",
        ";ID  |SEX| SUBSET           |MINUTES| NAME\n",
    ]
    records = []
    for s in speakers:
        subset = HELDOUT if s.heldout else TRAIN
        minutes = seconds[s.speaker_id][subset] / 60
        lines.append(f"{s.speaker_id:<5}| {s.voice.sex} | {subset:<16} | {minutes:5.2f} | {s.description()}\n")
        records.append({
            "speaker_id": s.speaker_id, "sex": s.voice.sex, "subset": subset, "heldout": s.heldout,
            "base": s.base, "engine": s.voice.engine, "voice": s.voice.voice,
            "base_seen_in_training": s.base in config.train_voices,
            "pitch_semitones": s.pitch, "rate": s.rate, "engine_params": s.engine_params(),
            "category_prefs": s.category_prefs, "description": s.description(),
            "utterances": dict(counts[s.speaker_id]),
            "minutes": {k: round(v / 60, 3) for k, v in seconds[s.speaker_id].items()},
        })
    (root / "SPEAKERS.TXT").write_text("".join(lines))
    (root / "speakers.json").write_text(json.dumps(records, indent=2) + "\n")


def _write_lm_text(root: Path, config: CorpusConfig) -> None:
    """LM_TEXT: one sentence per line, like LibriSpeech's LM corpus, which ships without audio."""
    if not config.lm_sentences:
        return
    rng = random.Random(f"{config.seed}:lm_text")
    (root / LM_TEXT).write_text("".join(f"{s}\n" for s in lm_sentences(rng, config.lm_sentences,
                                                                       config.eval_fraction)))


def synthesize_corpus(output_dir: Path, config: CorpusConfig, nj: int = 2) -> dict:
    """Write <output_dir>/{train-clean-100,dev-clean,test-clean,test-other}/SPEAKER/CHAPTER/...
    and the LM text <output_dir>/librispeech-lm-norm.txt.

    Renders into <output_dir>.partial and renames at the end, so an interrupted
    run never leaves a half corpus that looks finished. Returns a summary dict.
    """
    root = Path(output_dir)
    marker = root / ".done"
    if marker.exists():
        recorded = json.loads(marker.read_text())
        if recorded["config"] != config.to_dict():
            raise RuntimeError(f"{root} holds a corpus synthesized with a different config or seed "
                               f"(see {marker}); remove it (rm -r {root}) or pick another --output_dir")
        logger.info("Corpus already synthesized in %s with this config and seed: nothing to do", root)
        return {**recorded["summary"], "skipped": True}
    if root.exists() and any(root.iterdir()):
        raise RuntimeError(f"{root} exists but is not a finished synthesized corpus (no .done); "
                           f"remove it (rm -r {root}) or pick another --output_dir")

    start = time.perf_counter()
    speakers = make_speakers(config)
    check_tools({s.base for s in speakers})
    plan = make_plan(config, speakers)

    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    for chapter_dir in {u.path(partial).parent for u in plan}:
        chapter_dir.mkdir(parents=True)
    tmp = partial / ".tmp"
    tmp.mkdir()
    durations: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=max(1, nj)) as pool, \
            tqdm(total=len(plan), desc="synthesize", unit="utt") as progress:
        futures = [pool.submit(_render_batch, batch, partial, tmp) for batch in _batches(plan)]
        for future in as_completed(futures):
            done = future.result()
            durations.update(done)
            progress.update(len(done))
    tmp.rmdir()
    _write_transcripts(partial, plan)
    _write_speakers(partial, config, speakers, plan, durations)
    _write_lm_text(partial, config)

    subset_speakers: dict[str, set[int]] = defaultdict(set)
    utterances: dict[str, int] = defaultdict(int)
    for u in plan:
        subset_speakers[u.subset].add(u.speaker.speaker_id)
        utterances[u.subset] += 1
    summary = {
        "speakers": {s: len(subset_speakers[s]) for s in SUBSETS},
        "utterances": {s: utterances[s] for s in SUBSETS},
        "total_utterances": len(plan),
        "hours": round(sum(durations.values()) / 3600, 4),
        "seconds": round(time.perf_counter() - start, 2),
    }
    (partial / ".done").write_text(json.dumps({"config": config.to_dict(), "summary": summary}, indent=2) + "\n")
    if root.exists():
        root.rmdir()  # empty, checked above
    partial.rename(root)
    logger.info("Synthesized %s: speakers %s, utterances %d, %.3f hours, %.1f s",
                root, summary["speakers"], summary["total_utterances"], summary["hours"], summary["seconds"])
    return summary
