"""The decoding language model (run.sh stage 4, `--use_lm true`): ESPnet's LM trainer on external text.

LibriSpeech's recipes decode with an LM trained on its LM corpus: text that came
without audio and that leaves out the books of dev and test. The same holds here.
The LM text is public and outside the federation: no client transcript is read,
so no client's data leaves the client. Without an LM corpus, asr.sh trains the LM
on the training set's text; run.sh does the same with `--corpus_dir` and no
`--lm_text` (`write_client_transcripts`), and then the server reads the clients'
transcripts, as it does for the tokenizer. The model is a stock ESPnet LM, trained by
`espnet2.bin.lm_train` as `asr.sh` stages 6-7 train it, and `Speech2Text` loads it
with `lm_train_config` / `lm_file`.
"""
from __future__ import annotations

import gzip
import json
import logging
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

from ..atomic import atomic_path
from ..data.markers import content_digest, file_stamp, is_done, mark_done

logger = logging.getLogger(__name__)

INPUTS = "inputs.json"  # what an LM directory was, or is being, trained from
DONE = ".done"
MODEL = "valid.loss.best.pth"
LOG = "train.log"


def read_sentences(path: Path) -> Iterator[str]:
    """Sentences of a plain-text LM corpus (.txt or .txt.gz), one per line, blank lines skipped."""
    path = Path(path)
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
        for line in f:
            line = " ".join(line.split())
            if line:
                yield line


def write_client_transcripts(clients_jsonl: Path, output: Path) -> Path:
    """Every training client's transcripts, one per line: asr.sh's default LM text (the training
    set's `text`) when no LM corpus is given. Returns `output`.

    The file is replaced only when its content changes: `train_lm` stamps its text file, so a
    re-run with the same clients trains nothing again.
    """
    from fl_lib.data.tokenizer import client_transcripts

    output = Path(output)
    lines = [" ".join((text or "").split()) for text in client_transcripts(clients_jsonl)]
    body = "".join(line + "\n" for line in lines if line)
    if not body:
        raise ValueError(f"{clients_jsonl}: no client transcript to train an LM on")
    count = body.count("\n")
    if output.is_file() and output.read_text(encoding="utf-8") == body:
        logger.info("%s already holds the %d transcripts of %s", output, count, clients_jsonl)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(output) as tmp:
            tmp.write_text(body, encoding="utf-8")
        logger.info("LM text: %d transcripts of the clients of %s -> %s", count, clients_jsonl, output)
    return output


def prepare_lm_text(text: Path, output_dir: Path, token_list: Path, valid_fraction: float,
                    seed: int) -> tuple[Path, Path]:
    """ESPnet's `<id> <sentence>` files train.txt and valid.txt, a seeded random split of `text`.

    Sentences with characters outside the token list are kept (ESPnet maps them to
    <unk>) and counted in the log, so a corpus in another case or alphabet shows up at once.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    chars = set("".join(Path(token_list).read_text(encoding="utf-8").split()))
    rng = random.Random(seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    train, valid = output_dir / "train.txt", output_dir / "valid.txt"
    counts = {"train": 0, "valid": 0, "oov": 0}
    example = None
    with open(train, "w", encoding="utf-8") as ft, open(valid, "w", encoding="utf-8") as fv:
        for i, sentence in enumerate(read_sentences(text)):
            part = "valid" if rng.random() < valid_fraction else "train"
            (fv if part == "valid" else ft).write(f"lm_{i:08d} {sentence}\n")
            counts[part] += 1
            if set(sentence.replace(" ", "")) - chars:
                counts["oov"] += 1
                example = example or sentence
    if not counts["train"] or not counts["valid"]:
        raise ValueError(f"{text}: {counts['train']} training and {counts['valid']} validation sentences; "
                         f"the LM needs both (more text, or another valid_fraction)")
    if counts["oov"]:
        logger.warning("%d of %d LM sentences hold characters outside %s (they become <unk>), e.g. %r",
                       counts["oov"], counts["train"] + counts["valid"], token_list, example)
    logger.info("LM text %s: %d training, %d validation sentences", text, counts["train"], counts["valid"])
    return train, valid


def _lm_train(args: list[str]) -> None:
    """Run ESPnet's LM trainer in its own process, as asr.sh does; its log goes to our stdout."""
    cmd = [sys.executable, "-m", "espnet2.bin.lm_train", *args]
    logger.info("%s", " ".join(cmd))
    subprocess.run(cmd, check=True)


def train_lm(lm_config: Path, text: Path, token_list: Path, bpemodel: Optional[Path], output_dir: Path,
             valid_fraction: float = 0.05, fold_length: int = 150, seed: int = 0, ngpu: int = 0) -> Path:
    """Train an ESPnet LM on `text` into `output_dir`; returns its `valid.loss.best.pth`.

    Tokens as the ASR model's: the sentencepiece `bpemodel` of stage 4, or ESPnet's
    `char` tokens (with `<space>`) when it is None.

    Idempotent: a finished directory trained from the same inputs returns at once;
    one trained from other inputs is retrained from scratch; an interrupted one resumes.
    """
    output_dir = Path(output_dir)
    stamp = {"lm_config": content_digest(lm_config), "text": file_stamp(text),
             "token_list": content_digest(token_list),
             "bpemodel": content_digest(bpemodel) if bpemodel else None,
             "valid_fraction": valid_fraction, "fold_length": fold_length, "seed": seed}
    if is_done(output_dir / DONE, stamp, [output_dir / MODEL, output_dir / "config.yaml"]):
        logger.info("LM in %s already trained from these inputs: nothing to do", output_dir)
        return output_dir / MODEL
    inputs = output_dir / INPUTS
    # train.log is run.sh's log of this very run; anything else was left by a training.
    left = [p for p in output_dir.iterdir() if p.name != LOG] if output_dir.is_dir() else []
    if left:
        if not inputs.is_file():
            raise RuntimeError(f"{output_dir} exists and was not written by fl_lib.bin.train_lm (no {INPUTS}); "
                               f"remove it or pick another --output_dir")
        if json.loads(inputs.read_text(encoding="utf-8")) != stamp:
            logger.info("%s was trained from other inputs or settings: training again", output_dir)
            for path in left:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    inputs.write_text(json.dumps(stamp, sort_keys=True), encoding="utf-8")

    train, valid = prepare_lm_text(text, output_dir / "data", token_list, valid_fraction, seed)
    tokens = ["--token_type", "bpe", "--bpemodel", str(bpemodel)] if bpemodel else ["--token_type", "char"]
    common = ["--use_preprocessor", "true", *tokens, "--token_list", str(token_list), "--non_linguistic_symbols", "none", "--cleaner", "none",
              "--g2p", "none", "--train_data_path_and_name_and_type", f"{train},text,text",
              "--valid_data_path_and_name_and_type", f"{valid},text,text", "--config", str(lm_config),
              "--ngpu", str(ngpu), "--seed", str(seed)]
    stats = output_dir / "stats"
    # Pass 1, ESPnet's collect_stats: sentence lengths in tokens, for its length-bucketed batches.
    _lm_train([*common, "--collect_stats", "true", "--train_shape_file", str(train),
               "--valid_shape_file", str(valid), "--output_dir", str(stats)])
    _lm_train([*common, "--train_shape_file", str(stats / "train/text_shape"),
               "--valid_shape_file", str(stats / "valid/text_shape"), "--fold_length", str(fold_length),
               "--resume", "true", "--output_dir", str(output_dir)])
    if not (output_dir / MODEL).is_file():
        raise RuntimeError(f"ESPnet's LM trainer finished without {output_dir / MODEL}: "
                           f"the LM config must keep `best_model_criterion: [[valid, loss, min]]`")
    mark_done(output_dir / DONE, stamp)
    return output_dir / MODEL
