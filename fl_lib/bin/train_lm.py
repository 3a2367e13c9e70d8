"""Stage 4 of egs/librispeech_fl (--use_lm true): an ESPnet LM on external text, for decoding.

    python -m fl_lib.bin.train_lm --lm_config conf/train_lm_rnn.yaml \
        --text data/corpus/LibriSpeech/librispeech-lm-norm.txt \
        --token_list data/token_list/char/tokens.txt --bpemodel data/token_list/char/bpe.model \
        --output_dir exp/lm_train_lm_rnn
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fl_lib.log import setup_logging


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm_config", type=Path, required=True, help="ESPnet LM training yaml (lm, lm_conf, optim, ...)")
    p.add_argument("--text", type=Path, required=True,
                   help="plain-text LM corpus, one sentence per line (.txt or .txt.gz), e.g. fl_lib.bin.client_text's")
    p.add_argument("--token_list", type=Path, required=True, help="tokens.txt of stage 4")
    p.add_argument("--bpemodel", type=Path, default=None,
                   help="bpe.model of stage 4; none: ESPnet's char tokens (with <space>)")
    p.add_argument("--output_dir", type=Path, required=True, help="gets config.yaml and valid.loss.best.pth")
    p.add_argument("--valid_fraction", type=float, default=0.05, help="share of the text held out for LM validation")
    p.add_argument("--fold_length", type=int, default=150, help="ESPnet's batch folding length, in tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ngpu", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    setup_logging()
    from fl_lib.asr.lm import train_lm

    for path in (args.lm_config, args.text, args.token_list, args.bpemodel):
        if path is not None and not path.is_file():
            sys.exit(f"train_lm: {path} does not exist")
    try:
        train_lm(args.lm_config, args.text, args.token_list, args.bpemodel, args.output_dir,
                 valid_fraction=args.valid_fraction, fold_length=args.fold_length, seed=args.seed, ngpu=args.ngpu)
    except (ValueError, RuntimeError, subprocess.CalledProcessError) as err:
        sys.exit(f"train_lm: {err}")


if __name__ == "__main__":
    main()
