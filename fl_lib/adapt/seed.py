"""Stage 3: check the seed model and copy it into the experiment, self-contained.

A seed experiment's config.yaml names its token list, sentencepiece model and
feature statistics by paths relative to the recipe that trained it; the copy
under ``exp/seed`` holds those files and absolute paths, so decoding and
adaptation run from this recipe. Every check here runs before any decoding: a
missing seed, or weights made for another token list, fail in seconds.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import yaml

from fl_lib.atomic import atomic_path
from fl_lib.data.markers import file_stamp, is_done, mark_done

logger = logging.getLogger(__name__)
DONE_MARKER = ".import_seed.done"
HOW_TO_TRAIN = (
    "train one with the librispeech_fl recipe first:\n"
    "    (cd ../librispeech_fl && ./run.sh --stage 0 --stop_stage 5 --fl_config conf/fl_fedavg.yaml)\n"
    "then run this recipe with --seed_exp ../librispeech_fl/exp/fl_fedavg_train_asr_conformer_ctc"
)


class SeedError(ValueError):
    """The seed model cannot be used; the message says what to do."""


def _resolve(path: str, seed_exp: Path) -> Path:
    """A path of the seed's config: absolute, else relative to the recipe that trained it (exp/<tag>/../..)."""
    p = Path(path)
    if p.is_absolute():
        return p
    for base in (seed_exp.parent.parent, Path.cwd()):
        if (base / p).exists():
            return (base / p).resolve()
    raise SeedError(f"{seed_exp}/config.yaml names {path}, found neither under {seed_exp.parent.parent} nor here")


def check_tokens(token_list: list, state_dict: dict, bpemodel: Path, where: str) -> None:
    """The weights, the token list and the sentencepiece model must describe the same vocabulary."""
    import sentencepiece as spm

    out = state_dict.get("ctc.ctc_lo.weight")
    if out is None:
        raise SeedError(f"{where}: the model has no CTC output layer (ctc.ctc_lo); confidence needs CTC posteriors")
    if out.shape[0] != len(token_list):
        raise SeedError(f"{where}: incompatible seed model: its CTC layer has {out.shape[0]} outputs but its "
                        f"token list has {len(token_list)} tokens (weights made for another token list)")
    sp = spm.SentencePieceProcessor(model_file=str(bpemodel))
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i))}
    missing = sorted(pieces - set(token_list))
    if missing:
        raise SeedError(f"{where}: incompatible seed model: {bpemodel} makes pieces that its token list lacks: "
                        f"{missing[:10]} (another token list)")


def import_seed(seed_exp: Optional[Path], model: str, output_dir: Path) -> Path:
    """Check ``seed_exp``'s ``model`` and write ``output_dir/{config.yaml, model.pth, tokens.txt, bpe.model,
    feats_stats.npz, asr_config.yaml, adapt_asr_config.yaml}``; returns output_dir.

    ``adapt_asr_config.yaml`` is the seed's model config with ``init_param`` set to
    the seed weights: what federated adaptation starts from.
    """
    from fl_lib.asr.average import resolve_model
    from fl_lib.fl.checkpoint import CheckpointError, load_weights

    if not seed_exp:
        raise SeedError(f"no seed model given (--seed_exp); {HOW_TO_TRAIN}")
    seed_exp, output_dir = Path(seed_exp).resolve(), Path(output_dir)
    config_path, asr_config_path = seed_exp / "config.yaml", seed_exp / "asr_config.yaml"
    for path in (config_path, asr_config_path):
        if not path.is_file():
            raise SeedError(f"seed model {seed_exp}: {path.name} missing (not an fl_lib experiment, or not trained); "
                            f"{HOW_TO_TRAIN}")
    try:  # weights only: a seed model comes from another experiment directory, and a full unpickler runs code
        model_path = resolve_model(seed_exp, model)
        state = load_weights(model_path)
    except FileNotFoundError as err:
        raise SeedError(f"seed model: {err}; {HOW_TO_TRAIN}") from None
    except CheckpointError as err:
        raise SeedError(f"seed model {err}") from None
    done = output_dir / DONE_MARKER
    stamp = {"config": file_stamp(config_path), "model": file_stamp(model_path)}
    outputs = [output_dir / n for n in ("config.yaml", "model.pth", "adapt_asr_config.yaml")]
    if is_done(done, stamp, outputs):
        logger.info("seed %s already imported into %s: skipping", model_path, output_dir)
        return output_dir

    config = yaml.safe_load(config_path.read_text())
    token_list = config.get("token_list")
    if not isinstance(token_list, list) or not config.get("bpemodel"):
        raise SeedError(f"{config_path}: needs token_list and bpemodel to detokenize the pseudo-labels")
    bpemodel = _resolve(config["bpemodel"], seed_exp)
    check_tokens(token_list, state, bpemodel, str(model_path))

    output_dir.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    shutil.copyfile(bpemodel, output_dir / "bpe.model")
    (output_dir / "tokens.txt").write_text("".join(t + "\n" for t in token_list), encoding="utf-8")
    config["bpemodel"] = str((output_dir / "bpe.model").resolve())
    stats = (config.get("normalize_conf") or {}).get("stats_file")
    if stats:
        shutil.copyfile(_resolve(stats, seed_exp), output_dir / "feats_stats.npz")
        config["normalize_conf"]["stats_file"] = str((output_dir / "feats_stats.npz").resolve())
    with atomic_path(output_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config, indent=4, sort_keys=False, allow_unicode=True), encoding="utf-8")
    with atomic_path(output_dir / "model.pth") as tmp:
        shutil.copyfile(model_path, tmp)
    asr_config = yaml.safe_load(asr_config_path.read_text()) or {}
    shutil.copyfile(asr_config_path, output_dir / "asr_config.yaml")
    asr_config["init_param"] = [str((output_dir / "model.pth").resolve())]
    with atomic_path(output_dir / "adapt_asr_config.yaml") as tmp:
        tmp.write_text("# The seed's model config; adaptation starts from the seed's weights (init_param).\n"
                       + yaml.safe_dump(asr_config, sort_keys=False), encoding="utf-8")
    (output_dir / "seed.json").write_text(json.dumps({"seed_exp": str(seed_exp), "model": str(model_path),
                                                      "num_tokens": len(token_list)}, indent=2) + "\n")
    logger.info("seed %s (%d tokens) -> %s", model_path, len(token_list), output_dir)
    mark_done(done, stamp)
    return output_dir


LM_DIR = "lm"  # beside the seed: the decoding LM of the seed recipe, and the text it learned
LM_DONE = ".import_lm.done"


def import_lm(lm_exp: Path, output_dir: Path) -> Path:
    """Copy the seed recipe's decoding LM (librispeech_fl stage 4) into ``output_dir/lm``: config.yaml
    (token list and sentencepiece model of the seed), model.pth, and text.txt, the text it was trained
    on (the `k2_lm` confidence's n-gram learns the same text). Returns that directory.

    Run after import_seed: the LM must speak the seed's tokens, or its scores would mean nothing.
    """
    from fl_lib.asr.lm import INPUTS, MODEL
    from fl_lib.fl.checkpoint import CheckpointError, load_weights

    lm_exp, seed_dir = Path(lm_exp).resolve(), Path(output_dir)
    out = seed_dir / LM_DIR
    for path in (lm_exp / "config.yaml", lm_exp / MODEL, lm_exp / INPUTS):
        if not path.is_file():
            raise SeedError(f"seed LM {lm_exp}: {path.name} missing (not trained by fl_lib.bin.train_lm, or not "
                            f"finished); train it with the seed recipe's stage 4, or run with --use_lm false")
    text = Path(json.loads((lm_exp / INPUTS).read_text())["text"]["path"])
    if not text.is_file():
        raise SeedError(f"seed LM {lm_exp} was trained on {text}, which is gone: the k2_lm n-gram needs it")
    done = out / LM_DONE
    stamp = {"config": file_stamp(lm_exp / "config.yaml"), "model": file_stamp(lm_exp / MODEL),
             "text": file_stamp(text), "seed": file_stamp(seed_dir / "model.pth")}
    if is_done(done, stamp, [out / "config.yaml", out / "model.pth", out / "text.txt"]):
        logger.info("seed LM %s already imported into %s: skipping", lm_exp, out)
        return out
    config = yaml.safe_load((lm_exp / "config.yaml").read_text())
    tokens = (seed_dir / "tokens.txt").read_text(encoding="utf-8").split()
    lm_tokens = config.get("token_list")
    if isinstance(lm_tokens, str):
        lm_tokens = _resolve(lm_tokens, lm_exp).read_text(encoding="utf-8").split()
    if lm_tokens != tokens:
        raise SeedError(f"seed LM {lm_exp} has another token list than the seed ({len(lm_tokens or [])} and "
                        f"{len(tokens)} tokens): train the LM in the seed's recipe, on its token list")
    try:  # weights only, as the seed model
        load_weights(lm_exp / MODEL)
    except CheckpointError as err:
        raise SeedError(f"seed LM {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    config["token_list"] = tokens
    if config.get("bpemodel"):
        config["bpemodel"] = str((seed_dir / "bpe.model").resolve())
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config, indent=4, sort_keys=False, allow_unicode=True), encoding="utf-8")
    with atomic_path(out / "model.pth") as tmp:
        shutil.copyfile(lm_exp / MODEL, tmp)
    from fl_lib.asr.lm import read_sentences
    with atomic_path(out / "text.txt") as tmp:
        tmp.write_text("".join(line + "\n" for line in read_sentences(text)), encoding="utf-8")
    logger.info("seed LM %s (trained on %s) -> %s", lm_exp, text, out)
    mark_done(done, stamp)
    return out


# Keys a student config may add: they act in training only, so the seed's weights load unchanged
# and the adapted model is the seed's architecture (input noise; parameters left as the seed's).
STUDENT_KEYS = frozenset({"specaug", "specaug_conf", "freeze_param"})


def student_asr_config(seed_dir: Path, student_config: Path, output: Path) -> Path:
    """The seed's adaptation config plus ``student_config``'s training-only keys (SpecAugment, frozen parameters).

    The noise of a noisy student: a student that sees its teacher's labels on
    perturbed input learns more from them than a copy of the teacher would.
    """
    student = yaml.safe_load(Path(student_config).read_text()) or {}
    changes_model = sorted(set(student) - STUDENT_KEYS)
    if changes_model:
        raise SeedError(f"{student_config}: {changes_model} would change the seed's model; a student config "
                        f"may set only {sorted(STUDENT_KEYS)}")
    if not student:
        raise SeedError(f"{student_config} is empty: it would do nothing")
    config = yaml.safe_load((Path(seed_dir) / "adapt_asr_config.yaml").read_text())
    config.update(student)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        tmp.write_text(f"# The seed's adaptation config plus {student_config}.\n" + yaml.safe_dump(config, sort_keys=False),
                       encoding="utf-8")
    return output
