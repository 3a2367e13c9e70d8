"""Stage 4 of egs/librispeech_fl with --corpus_dir and no --lm_text: the LM text is the training
clients' transcripts, one per line, as asr.sh's default lm_train_text (the training set's text).

    python -m fl_lib.bin.client_text --clients data/clients/train-clean-100/clients.jsonl \
        --output data/clients/train-clean-100/transcripts.txt

The file is rewritten only when its content changes, so fl_lib.bin.train_lm does not train again.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fl_lib.log import setup_logging


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=Path, required=True, help="clients.jsonl of stage 2")
    p.add_argument("--output", type=Path, required=True, help="the text file to write")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    setup_logging()
    from fl_lib.asr.lm import write_client_transcripts

    if not args.clients.is_file():
        sys.exit(f"client_text: {args.clients} does not exist (stage 2)")
    try:
        write_client_transcripts(args.clients, args.output)
    except ValueError as err:
        sys.exit(f"client_text: {err}")


if __name__ == "__main__":
    main()
