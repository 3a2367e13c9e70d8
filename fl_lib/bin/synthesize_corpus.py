"""Stage 0 of egs/librispeech_fl: synthesize the embedded corpus in LibriSpeech's layout.

    python -m fl_lib.bin.synthesize_corpus --config conf/corpus.yaml \
        --output_dir data/corpus/LibriSpeech --seed 1234 --nj 2
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from fl_lib.log import setup_logging


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="corpus YAML (fields of CorpusConfig)")
    parser.add_argument("--output_dir", type=Path, required=True, help="the LibriSpeech root to create")
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    parser.add_argument("--nj", type=int, default=2, help="parallel rendering workers")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    setup_logging()
    # Imported here so --help stays instant.
    from fl_lib.corpus.synthesize import CorpusConfig, synthesize_corpus

    config = CorpusConfig.from_yaml(args.config, seed=args.seed)
    try:
        summary = synthesize_corpus(args.output_dir, config, nj=args.nj)
    except RuntimeError as err:  # missing tools, a foreign or stale output dir: the message says what to do
        logging.error("%s", err)
        sys.exit(1)
    logging.info("Summary: %s", json.dumps(summary))


if __name__ == "__main__":
    main()
