"""Stage 4: pseudo-label every session's adaptation audio with a teacher model.

The dev parts are labelled the same way (`part="dev"`) to choose the confidence
filter on them: there the truth is known, so the labels' WER can be read.

ESPnet's beam search (`Speech2Text`, the decode config of the recipe) gives the
hypothesis and its beam score; the CTC log-posteriors of the same encoder pass
go to a Kaldi ark/scp (kaldiio) for the k2 confidence stage in `.venv-k2`.
The adaptation manifests hold no transcripts, so nothing here can read them.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from fl_lib.adapt.sessions import load_sessions
from fl_lib.confidence.tables import write_jsonl
from fl_lib.data.markers import file_stamp, files_digest, is_done, mark_done

logger = logging.getLogger(__name__)
DONE_MARKER = ".pseudo_label.done"


def _label_cut(cut) -> tuple[dict, Any]:
    """(hyps.jsonl row, [T, V] float32 CTC log-posteriors) of one cut, in a decoding worker.

    One encoder pass serves both: Speech2Text's own per-sample beam search runs on
    the encoder output that the CTC layer turns into posteriors.
    """
    import torch

    from fl_lib.asr.decode import mono_audio, worker_model

    s2t, fs = worker_model()
    audio = mono_audio(cut, fs)
    start = time.perf_counter()
    with torch.no_grad():
        speech = torch.from_numpy(audio).unsqueeze(0)
        enc, enc_lens = s2t.asr_model.encode(speech, speech.new_full([1], speech.shape[1], dtype=torch.long))
        text, _, token_int, hyp = s2t._decode_single_sample(enc[0])[0]
        logp = s2t.asr_model.ctc.log_softmax(enc)[0, : int(enc_lens[0])]
    row = {"utt_id": cut.id, "session": cut.supervisions[0].speaker, "text": text,
           "token_int": [int(t) for t in token_int], "score": float(hyp.score),
           "num_frames": int(logp.shape[0]), "duration": cut.duration,
           "seconds": round(time.perf_counter() - start, 4)}
    return row, logp.numpy()


PARTS = ("adapt", "dev")


def pseudo_label(sessions_path: Path, exp_dir: Path, model: str, inference_config: Path, output_dir: Path,
                 nj: int = 1, part: str = "adapt", lm_train_config: Optional[Path] = None,
                 lm_file: Optional[Path] = None) -> Path:
    """Write output_dir/{hyps.jsonl, logp.ark, logp.scp} for every session's `part` (adapt or dev);
    return hyps.jsonl. With an LM (`lm_train_config`, `lm_file`), the beam search fuses it as the
    decode config says; the CTC posteriors stay the acoustic model's."""
    import kaldiio
    from lhotse import CutSet, load_manifest
    from tqdm import tqdm

    from fl_lib.asr.average import resolve_model
    from fl_lib.asr.decode import decode_iter, load_inference_config, with_lm

    if part not in PARTS:
        raise ValueError(f"pseudo-labels are made for the parts {', '.join(PARTS)}, not '{part}'")
    exp_dir, output_dir = Path(exp_dir), Path(output_dir)
    sessions = load_sessions(sessions_path)
    decode = with_lm(load_inference_config(Path(inference_config)), lm_train_config, lm_file)
    model_path = resolve_model(exp_dir, model)
    hyps_path = output_dir / "hyps.jsonl"
    done = output_dir / DONE_MARKER
    stamp = {"model": file_stamp(model_path), "config": file_stamp(exp_dir / "config.yaml"), "decode": decode,
             "lm": file_stamp(lm_file) if lm_file else None,
             part: files_digest(getattr(s, part) for s in sessions)}
    if is_done(done, stamp, [hyps_path, output_dir / "logp.scp"]):
        logger.info("pseudo-labels of %s already in %s: skipping", model_path, output_dir)
        return hyps_path
    output_dir.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    cuts = CutSet.from_cuts(c for s in sessions for c in load_manifest(getattr(s, part)))
    settings = {"config": str(exp_dir / "config.yaml"), "model": str(model_path), "device": "cpu", "decode": decode}
    nj = max(1, min(nj, len(cuts)))
    logger.info("pseudo-labelling %d %s utterances of %d sessions with %s, nj=%d",
                len(cuts), part, len(sessions), model_path, nj)
    rows = []
    start = time.perf_counter()
    ark = output_dir.resolve() / "logp.ark"  # absolute in the scp, so the table reads from anywhere
    with kaldiio.WriteHelper(f"ark,scp:{ark},{output_dir / 'logp.scp'}") as writer:
        for row, logp in tqdm(decode_iter(list(cuts), settings, nj, task=_label_cut), total=len(cuts),
                              desc="pseudo-label"):
            writer(row["utt_id"], logp)
            rows.append(row)
    write_jsonl(hyps_path, rows)
    audio = sum(r["duration"] for r in rows)
    (output_dir / "pseudo_label.json").write_text(json.dumps(
        {"model": str(model_path), "part": part, "inference_config": decode, "num_utts": len(rows), "nj": nj,
         "audio_seconds": round(audio, 2), "wall_seconds": round(time.perf_counter() - start, 2)}, indent=2) + "\n")
    logger.info("%d pseudo-labels -> %s (%.1f s)", len(rows), hyps_path, time.perf_counter() - start)
    mark_done(done, stamp)
    return hyps_path
