"""Stage 1: Lhotse recordings/supervisions/cuts manifests of a LibriSpeech-layout corpus."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fl_lib.data.corpus_check import CorpusError
from fl_lib.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus_dir", type=Path, required=True, help="LibriSpeech root holding train-clean-100/ ...")
    parser.add_argument("--output_dir", type=Path, required=True, help="where the jsonl.gz manifests go")
    parser.add_argument("--nj", type=int, default=1, help="threads for the audio checks and lhotse")
    args = parser.parse_args(argv)
    setup_logging()
    from fl_lib.data.manifests import prepare_manifests

    try:
        cuts = prepare_manifests(args.corpus_dir, args.output_dir, nj=args.nj)
    except CorpusError as err:
        logging.error("%s", err)
        return 1
    for part, path in cuts.items():
        logging.info("%s: %s", part, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
