"""Stage 0 with --corpus_dir: check that a directory holds a LibriSpeech-layout corpus."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fl_lib.data.corpus_check import CorpusError, check_corpus_layout
from fl_lib.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus_dir", type=Path, required=True, help="LibriSpeech root holding train-clean-100/ ...")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        parts = check_corpus_layout(args.corpus_dir)
    except CorpusError as err:
        logging.error("%s", err)
        return 1
    logging.info("%s holds LibriSpeech subsets: %s", args.corpus_dir, " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
