"""Stage 7 of egs/session_adapt, with --wiseft_alphas: interpolate the adapted model with the seed
(WiSE-FT), one checkpoint per alpha, written beside the adapted model; prints their names.

    python -m fl_lib.bin.interpolate_seed --exp_dir exp/adapt/gen1/fl --model valid.acc.best.pth \\
        --seed_model exp/seed/model.pth --alphas 0.25 0.5 0.75

alpha is the adapted model's share: 0 is the seed, 1 the adapted model. Which alpha is kept is
chosen on the dev parts (fl_lib.bin.tune_decoding --models <these names>).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fl_lib.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp_dir", type=Path, required=True, help="the adapted model's experiment dir")
    p.add_argument("--model", default="valid.acc.best.pth", help="the adapted weights in exp_dir")
    p.add_argument("--seed_model", type=Path, required=True, help="the weights it was adapted from")
    p.add_argument("--alphas", type=float, nargs="+", required=True, help="the adapted model's shares, in [0, 1]")
    args = p.parse_args(argv)
    setup_logging()
    from fl_lib.adapt.interpolate import write_interpolations
    from fl_lib.fl.checkpoint import CheckpointError

    try:
        names = write_interpolations(args.exp_dir, args.model, args.seed_model, args.alphas)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"interpolate_seed: {e}", file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
