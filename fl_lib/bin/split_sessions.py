"""Stage 2 of egs/session_adapt: each session's cuts, split into an adaptation part (transcripts
removed), a dev part and a test part that share no sentence; the adaptation truth goes to
truth/adapt_text for scoring only.

    python -m fl_lib.bin.split_sessions --cuts data/manifests/librispeech_cuts_test-other.jsonl.gz \\
        --output_dir data/sessions/test-other --adapt_fraction 0.6 --dev_fraction 0.1 --seed 1234
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from fl_lib.log import setup_logging


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cuts", type=Path, required=True, help="cuts manifest of the sessions' part (one speaker = one session)")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--adapt_fraction", type=float, default=0.6, help="share of each session's utterances to adapt on")
    p.add_argument("--dev_fraction", type=float, default=0.1,
                   help="share of each session's utterances to choose settings on; the rest is its test part")
    p.add_argument("--seed", type=int, default=0, help="seeds which utterances adapt, which tune and which test")
    p.add_argument("--min_duration", type=float, default=0.0, help="shorter cuts are unusable (seconds)")
    p.add_argument("--max_duration", type=float, default=math.inf, help="longer cuts are unusable (seconds)")
    args = p.parse_args(argv)
    setup_logging()
    from fl_lib.adapt.sessions import split_sessions

    split_sessions(args.cuts, args.output_dir, args.adapt_fraction, dev_fraction=args.dev_fraction, seed=args.seed,
                   min_duration=args.min_duration, max_duration=args.max_duration)


if __name__ == "__main__":
    main()
