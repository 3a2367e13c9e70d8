"""Stage 3 of egs/session_adapt: check the seed model and copy it, self-contained, into exp/seed.

    python -m fl_lib.bin.import_seed --seed_exp ../librispeech_fl/exp/fl_fedavg_train_asr_conformer_ctc \\
        --model valid.acc.best.pth --output_dir exp/seed

Fails before any decoding when the seed is missing or its weights do not match its token list.
With `--lm_exp` (the seed recipe's stage-4 LM), the LM and its text go to exp/seed/lm,
checked against the seed's token list.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fl_lib.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed_exp", default="", help="the seed's experiment dir (config.yaml, asr_config.yaml, weights)")
    p.add_argument("--model", default="valid.acc.best.pth", help="weights in seed_exp (names as fl_lib.bin.decode takes)")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--lm_exp", type=Path, default=None, help="the seed recipe's decoding LM (fl_lib.bin.train_lm)")
    args = p.parse_args(argv)
    setup_logging()
    from fl_lib.adapt.seed import SeedError, import_lm, import_seed

    try:
        import_seed(args.seed_exp or None, args.model, args.output_dir)
        if args.lm_exp:
            import_lm(args.lm_exp, args.output_dir)
    except SeedError as err:
        logging.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
