"""Stage 2: length-filter a dev/test cuts manifest."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fl_lib.data.clients import filter_cuts
from fl_lib.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cuts", type=Path, required=True, help="input cuts manifest (jsonl.gz)")
    parser.add_argument("--output", type=Path, required=True, help="filtered cuts manifest (jsonl.gz)")
    parser.add_argument("--min_duration", type=float, default=0.0, help="drop shorter cuts (seconds)")
    parser.add_argument("--max_duration", type=float, default=math.inf, help="drop longer cuts (seconds)")
    args = parser.parse_args(argv)
    setup_logging()
    filter_cuts(args.cuts, args.output, args.min_duration, args.max_duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
