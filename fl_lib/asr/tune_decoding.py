"""Choose a model's checkpoint and LM weight on a dev set, with the decoding that will be reported.

The trainer ranks rounds by a cheap criterion (CTC-greedy dev WER, or the dev loss) and keeps
the N best. When the headline decodes with an LM in shallow fusion, the round best for the
acoustic model alone need not be best with the LM, and an LM weight tuned for one acoustic
model need not suit a better one. In session adaptation, 80 rounds instead of 40 gained the
acoustic model alone 4 points of WERR on test and lost the LM-fused decoding 5, with rounds
chosen by greedy dev WER. So each (candidate checkpoint, LM weight) is decoded on the dev set
exactly as the test set will be, and the lowest dev WER wins.

Outputs, in `output_dir`:
- `<checkpoint stem>_lm<weight>/`: each trial's decode dir (score.json, hyp.trn, ...);
- `trials.jsonl` and `TUNE.md`: every trial's dev WER;
- `decode.yaml`: the decoding config with the chosen LM weight;
- `model.pth`: a copy of the chosen checkpoint (kept round files may be pruned later);
- `choice.json`: what was chosen, written last: its presence means the tuning finished.
"""
from __future__ import annotations

import dataclasses
import filecmp
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import yaml

from ..atomic import atomic_path
from ..fl.checkpoint import atomic_copy
from .average import resolve_model, round_checkpoints
from .decode import decode_cuts, load_inference_config, with_lm
from .scoring import ErrorStats

logger = logging.getLogger(__name__)

KEPT = "kept"  # in `models`: every <N>round.pth the trainer kept (its N best by the dev criterion)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One candidate decoded on the dev set."""

    model: str
    lm_weight: Optional[float]
    errors: int
    words: int
    decode_dir: str

    @property
    def wer(self) -> float:
        return 100.0 * self.errors / self.words


def candidate_models(exp_dir: Path, models: Sequence[str]) -> list[str]:
    """File names of the checkpoints to try, `kept` expanded to the kept rounds in round order."""
    names: list[str] = []
    for model in models:
        if model == KEPT:
            kept = round_checkpoints(exp_dir)
            if not kept:
                raise ValueError(f"{exp_dir} keeps no <N>round.pth to choose from (fl_config keep_checkpoints)")
            names += [p.name for p in kept.values()]
        else:
            path = resolve_model(exp_dir, model)
            if path.resolve().parent != exp_dir.resolve():
                raise ValueError(f"candidate {model} is not a checkpoint of {exp_dir}: tuning chooses among one experiment's checkpoints")
            names.append(path.name)
    if len(set(names)) != len(names):
        raise ValueError(f"a checkpoint is named twice among the candidates: {names}")
    return names


def _decoded_already(decode_dir: Path, inputs: Sequence[Path], model_name: str, decode: dict, cuts: Path) -> Optional[dict]:
    """The trial's score.json when an earlier run decoded this very model, config and cut set
    after every input file (model, cuts, training config, LM) last changed; None otherwise."""
    score = decode_dir / "score.json"
    if not score.is_file():
        return None
    summary = json.loads(score.read_text(encoding="utf-8"))
    same = (summary.get("model") == model_name and summary.get("inference_config") == decode
            and summary.get("cuts") == str(cuts))
    newer = score.stat().st_mtime > max(Path(p).stat().st_mtime for p in inputs)
    return summary if same and newer else None


def tune_decoding(
    exp_dir: Path,
    models: Sequence[str],
    inference_config: Path,
    cuts: Path,
    output_dir: Path,
    lm_weights: Sequence[float] = (),
    nj: int = 1,
    device: str = "cpu",
    lm_train_config: Optional[Path] = None,
    lm_file: Optional[Path] = None,
) -> Trial:
    """Decode `cuts` with every (model, LM weight); returns the trial of fewest word errors.

    Without `lm_weights`, the config's own weight is the only one tried. Ties go to the
    earlier candidate: models in the order given (`kept` in round order), then weights.
    """
    exp_dir, output_dir = Path(exp_dir), Path(output_dir)
    own = load_inference_config(Path(inference_config))
    if lm_weights and lm_file is None and "lm_file" not in own:
        raise ValueError("lm_weights are tried with an LM: give lm_train_config and lm_file")
    base = with_lm(own, lm_train_config, lm_file)
    if any(w <= 0 for w in lm_weights):
        raise ValueError(f"lm_weights must be > 0 (an LM at weight 0 is refused by decoding), got {list(lm_weights)}")
    weights: list[Optional[float]] = list(lm_weights) or [base.get("lm_weight") if "lm_file" in base else None]
    names = candidate_models(exp_dir, models)
    (output_dir / "choice.json").unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    trials: list[Trial] = []
    for name in names:
        model_path = exp_dir / name
        for weight in weights:
            tag = f"{Path(name).stem}" + ("" if weight is None else f"_lm{weight:g}")
            config = {**own, **({} if weight is None else {"lm_weight": weight})}
            config_path = output_dir / f"{tag}.yaml"
            with atomic_path(config_path) as tmp:
                tmp.write_text(yaml.safe_dump(config, sort_keys=True), encoding="utf-8")
            decode_dir = output_dir / tag
            decode = with_lm(config, lm_train_config, lm_file)
            inputs = [model_path, cuts, exp_dir / "config.yaml", *(p for p in (lm_train_config, lm_file) if p is not None)]
            summary = _decoded_already(decode_dir, inputs, name, decode, cuts)
            if summary is None:
                summary = decode_cuts(exp_dir, name, config_path, cuts, decode_dir, nj=nj, device=device,
                                      lm_train_config=lm_train_config, lm_file=lm_file)
            else:
                logger.info("%s: decoded already, reused", decode_dir)
            wer = ErrorStats.from_dict(summary["wer"])
            trials.append(Trial(name, weight, wer.err, wer.wrd, str(decode_dir)))
    if trials[0].words == 0:
        raise ValueError(f"{cuts} has no words to score: nothing to choose by")
    best = min(trials, key=lambda t: t.errors)  # min keeps the first of equals
    _write_outputs(trials, best, own, exp_dir, output_dir, cuts)
    logger.info("chosen on %s: %s, lm_weight %s, WER %.2f %%", cuts, best.model, best.lm_weight, best.wer)
    return best


def _write_outputs(trials: list[Trial], best: Trial, config: dict, exp_dir: Path, output_dir: Path, cuts: Path) -> None:
    with atomic_path(output_dir / "trials.jsonl") as tmp:
        tmp.write_text("".join(json.dumps({**dataclasses.asdict(t), "wer": round(t.wer, 3)}) + "\n" for t in trials),
                       encoding="utf-8")
    weights = sorted({t.lm_weight for t in trials}, key=lambda w: (w is None, w or 0.0))
    cells = {(t.model, t.lm_weight): t for t in trials}
    lines = [f"# Dev WER (%) of each candidate, {cuts}", "",
             "|checkpoint|" + "|".join("config's weight" if w is None else f"lm_weight {w:g}" for w in weights) + "|",
             "|---|" + "---|" * len(weights)]
    for model in dict.fromkeys(t.model for t in trials):
        row = []
        for w in weights:
            t = cells.get((model, w))
            row.append("" if t is None else (f"**{t.wer:.2f}**" if t == best else f"{t.wer:.2f}"))
        lines.append(f"|{model}|" + "|".join(row) + "|")
    lines += ["", f"Chosen: {best.model}, lm_weight {best.lm_weight}, {best.errors} errors in {best.words} words."]
    with atomic_path(output_dir / "TUNE.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # An unchanged choice leaves decode.yaml and model.pth untouched, so that a decode made with
    # them stays newer than they are (run.sh reuses the seed's test decode on that condition).
    chosen = yaml.safe_dump({**config, **({} if best.lm_weight is None else {"lm_weight": best.lm_weight})}, sort_keys=True)
    path = output_dir / "decode.yaml"
    if not path.is_file() or path.read_text(encoding="utf-8") != chosen:
        with atomic_path(path) as tmp:
            tmp.write_text(chosen, encoding="utf-8")
    path = output_dir / "model.pth"
    if not path.is_file() or not filecmp.cmp(exp_dir / best.model, path, shallow=False):
        atomic_copy(exp_dir / best.model, path)
    with atomic_path(output_dir / "choice.json") as tmp:
        tmp.write_text(json.dumps({**dataclasses.asdict(best), "wer": round(best.wer, 3), "cuts": str(cuts),
                                   "candidates": len(trials)}, indent=2), encoding="utf-8")
