"""Stage 2: split cuts manifests into one federated client (cuts manifest) per speaker.

Several --cuts manifests (e.g. LibriSpeech's three 960 h training parts) make one federation.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fl_lib.data.clients import split_clients
from fl_lib.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cuts", type=Path, nargs="+", required=True, help="input cuts manifest(s) (jsonl.gz)")
    parser.add_argument("--output_dir", type=Path, required=True, help="gets clients.jsonl and cuts/<speaker>.jsonl.gz")
    parser.add_argument("--min_utts", type=int, default=1, help="drop clients with fewer cuts")
    parser.add_argument("--min_duration", type=float, default=0.0, help="drop shorter cuts (seconds)")
    parser.add_argument("--max_duration", type=float, default=math.inf, help="drop longer cuts (seconds)")
    args = parser.parse_args(argv)
    setup_logging()
    split_clients(args.cuts, args.output_dir, args.min_utts, args.min_duration, args.max_duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
