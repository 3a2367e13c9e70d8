"""Decode Lhotse cuts with ESPnet's `Speech2Text` in parallel worker processes.

Workers are spawned (not forked) so that ESPnet and torch start clean in each;
the parent never imports ESPnet. Cuts are handed out one at a time in order,
which balances long and short utterances across workers and keeps the merged
output in cut order whatever `nj` is.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import yaml

from fl_lib.asr import scoring
from fl_lib.atomic import atomic_path
from fl_lib.log import setup_logging

logger = logging.getLogger(__name__)

# Keys of ESPnet decode yamls (asr_inference.py options) that Speech2Text takes.
DECODE_KEYS = frozenset({
    "beam_size", "ctc_weight", "lm_weight", "ngram_weight", "penalty", "maxlenratio",
    "minlenratio", "nbest", "normalize_length", "batch_size", "dtype", "lm_train_config",
    "lm_file", "ngram_file", "ngram_scorer", "time_sync",
})


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """One decoded cut; `seconds` is the worker's decoding time, for the real-time factor."""

    utt_id: str
    speaker: str
    ref: str
    hyp: str
    duration: float
    seconds: float


def load_inference_config(path: Path) -> dict[str, Any]:
    """Read an ESPnet decode yaml, rejecting keys Speech2Text would not understand."""
    with open(path, encoding="utf-8") as f:
        conf = yaml.safe_load(f) or {}
    if not isinstance(conf, dict):
        raise ValueError(f"{path}: expected a mapping of decoding options, got {type(conf).__name__}")
    unknown = sorted(set(conf) - DECODE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown decoding options {unknown}; known: {sorted(DECODE_KEYS)}")
    if conf.get("nbest", 1) != 1:
        raise ValueError(f"{path}: nbest must be 1, scoring uses the best hypothesis only")
    return conf


# Per-process state of a decoding worker, set by _init_worker.
_WORKER: dict[str, Any] = {}


def _init_worker(settings: dict[str, Any], log_level: int) -> None:
    """Remember what to load; building Speech2Text happens in the first task so errors reach the parent."""
    import torch

    torch.set_num_threads(1)
    # ESPnet logs every utterance's beam search at INFO on the root logger.
    setup_logging(logging.WARNING)
    logger.setLevel(log_level)
    _WORKER.clear()
    _WORKER["settings"] = settings


def worker_model():
    """(Speech2Text, sampling rate) of this decoding worker, built on first use."""
    if "s2t" not in _WORKER:
        from fl_lib.espnet_env import quiet_nltk

        quiet_nltk()
        from espnet2.bin.asr_inference import Speech2Text

        s = _WORKER["settings"]
        s2t = Speech2Text(asr_train_config=s["config"], asr_model_file=s["model"],
                          device=s["device"], **s["decode"])
        if s2t.tokenizer is None:
            raise ValueError(f"{s['config']} sets no token_type/bpemodel: hypotheses cannot be detokenized")
        fs = s2t.asr_train_args.frontend_conf.get("fs", 16000)
        if isinstance(fs, str):
            import humanfriendly

            fs = humanfriendly.parse_size(fs)
        _WORKER.update(s2t=s2t, fs=int(fs))
        logger.info("worker ready: %s, %d Hz", type(s2t.beam_search).__name__, fs)
    return _WORKER["s2t"], _WORKER["fs"]


def mono_audio(cut, fs: int):
    """The cut's samples at the model's rate `fs`, one channel (1-D numpy array)."""
    if cut.sampling_rate != fs:
        cut = cut.resample(fs)
    audio = cut.load_audio()
    if audio.shape[0] != 1:
        raise ValueError(f"cut {cut.id} has {audio.shape[0]} channels; the ASR model takes mono")
    return audio[0]


def _decode_cut(cut) -> Hypothesis:
    import torch

    s2t, fs = worker_model()
    if not cut.supervisions:
        raise ValueError(f"cut {cut.id} has no supervision: nothing to score against")
    audio = mono_audio(cut, fs)
    start = time.perf_counter()
    with torch.no_grad():
        text = s2t(torch.from_numpy(audio))[0][0]
    sup = cut.supervisions[0]
    return Hypothesis(
        utt_id=cut.id, speaker=sup.speaker or cut.id, ref=sup.text or "", hyp=text,
        duration=cut.duration, seconds=time.perf_counter() - start,
    )


def decode_iter(cuts: Sequence, settings: dict[str, Any], nj: int, task=None) -> Iterator[Any]:
    """Yield `task(cut)` (default: the scored Hypothesis) in cut order from `nj` spawned workers.

    `task` must be a module-level function; it gets the worker's model from `worker_model()`.
    """
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(nj, initializer=_init_worker, initargs=(settings, logger.getEffectiveLevel())) as pool:
        yield from pool.imap(task or _decode_cut, cuts, chunksize=1)


def write_outputs(hyps: Sequence[Hypothesis], output_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write ESPnet's decode-dir files (text, ref.trn, hyp.trn) plus score.json and result.txt.

    Each file is written atomically and score.json, which RESULTS.md reads, goes last and is
    removed first (`decode_cuts` removes it before decoding, too): a decode killed part-way
    (or a full disk) leaves no score.json, never one that scores another decode's hypotheses."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "score.json").unlink(missing_ok=True)
    ids = [h.utt_id for h in hyps]
    spks = [h.speaker for h in hyps]
    refs = [h.ref for h in hyps]
    texts = [h.hyp for h in hyps]
    with atomic_path(output_dir / "text") as tmp:
        tmp.write_text("".join(f"{u} {scoring.normalize(t)}".rstrip() + "\n" for u, t in zip(ids, texts)), encoding="utf-8")
    for name, sentences in (("ref.trn", refs), ("hyp.trn", texts)):
        with atomic_path(output_dir / name) as tmp:
            scoring.write_trn(tmp, sentences, ids, spks)

    wer = scoring.score(refs, texts, "word")
    cer = scoring.score(refs, texts, "char")
    per_spk = scoring.score_by_speaker(refs, texts, spks, "word")
    audio = sum(h.duration for h in hyps)
    summary = {
        **info,
        "num_utts": len(hyps),
        "audio_seconds": round(audio, 3),
        "rtf": round(sum(h.seconds for h in hyps) / audio, 4) if audio else None,
        "wer": wer.to_dict(),
        "cer": cer.to_dict(),
        "per_speaker_wer": {spk: s.to_dict() for spk, s in per_spk.items()},
    }
    name = output_dir.name
    with atomic_path(output_dir / "result.txt") as tmp:
        tmp.write_text(f"# {name}: {info.get('model')}\n\n## WER\n\n{scoring.format_table({name: wer})}\n\n"
                       f"## CER\n\n{scoring.format_table({name: cer})}\n\n"
                       f"## WER per speaker\n\n{scoring.format_table(per_spk, 'speaker')}\n", encoding="utf-8")
    with atomic_path(output_dir / "score.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def with_lm(decode: dict[str, Any], lm_train_config: Optional[Path], lm_file: Optional[Path]) -> dict[str, Any]:
    """The decoding options with the LM given on the command line (asr.sh's --lm_train_config / --lm_file).

    An LM with lm_weight 0, or lm_weight > 0 without an LM, would be ignored by
    Speech2Text without a word: both are errors.
    """
    if (lm_train_config is None) != (lm_file is None):
        raise ValueError("lm_train_config and lm_file go together")
    if lm_train_config is not None:
        if "lm_train_config" in decode or "lm_file" in decode:
            raise ValueError("the LM is given twice: in the decoding config and on the command line")
        for path in (lm_train_config, lm_file):
            if not Path(path).is_file():
                raise ValueError(f"LM file {path} does not exist")
        decode = {**decode, "lm_train_config": str(lm_train_config), "lm_file": str(lm_file)}
    has_lm, weight = "lm_file" in decode, decode.get("lm_weight", 1.0)
    if has_lm and not weight:
        raise ValueError("an LM is given but lm_weight is 0: use a decoding config with lm_weight > 0")
    if weight and not has_lm and "lm_weight" in decode:
        raise ValueError(f"lm_weight is {weight} but no LM is given (lm_train_config / lm_file)")
    return decode


def decode_cuts(
    exp_dir: Path,
    model: str,
    inference_config: Path,
    cuts: Path,
    output_dir: Path,
    nj: int = 1,
    device: str = "cpu",
    lm_train_config: Optional[Path] = None,
    lm_file: Optional[Path] = None,
) -> dict[str, Any]:
    """Decode and score one cut set (run.sh stage 6); returns what score.json holds."""
    from lhotse import load_manifest
    from tqdm import tqdm

    from fl_lib.asr.average import resolve_model

    exp_dir = Path(exp_dir)
    config = exp_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} missing: exp_dir must hold the training config.yaml")
    if nj < 1:
        raise ValueError(f"nj must be >= 1, got {nj}")
    decode = with_lm(load_inference_config(Path(inference_config)), lm_train_config, lm_file)
    # An earlier decode's score must not stand for this one if this one stops part-way.
    (Path(output_dir) / "score.json").unlink(missing_ok=True)
    model_path = resolve_model(exp_dir, model)
    cutset = load_manifest(cuts)
    settings = {"config": str(config), "model": str(model_path), "device": device, "decode": decode}
    nj = min(nj, max(len(cutset), 1))
    logger.info("decoding %d cuts of %s with %s, nj=%d", len(cutset), cuts, model_path.name, nj)
    start = time.perf_counter()
    hyps = list(tqdm(decode_iter(list(cutset), settings, nj), total=len(cutset), desc=Path(output_dir).name))
    wall = time.perf_counter() - start
    info = {"model": model_path.name, "cuts": str(cuts), "inference_config": decode,
            "nj": nj, "wall_seconds": round(wall, 2)}
    summary = write_outputs(hyps, Path(output_dir), info)
    logger.info("%s: WER %s%%, CER %s%% (%d utts, %.1f s)", Path(output_dir).name,
                summary["wer"]["percent"]["Err"], summary["cer"]["percent"]["Err"], len(hyps), wall)
    return summary
