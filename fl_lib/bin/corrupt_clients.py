"""Make a federation where some clients have shuffled (or random) transcripts: data poisoning.

    python -m fl_lib.bin.corrupt_clients --clients data/clients/train-clean-100/clients.jsonl \\
        --num_corrupted 2 --seed 1 [--mode random] --output_dir data/clients/train-clean-100_corrupt2
"""
from __future__ import annotations

import argparse
from pathlib import Path
from fl_lib.log import setup_logging


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=Path, required=True, help="clients.jsonl of stage 2")
    p.add_argument("--num_corrupted", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=("shuffle", "random"), default="shuffle",
                   help="shuffle: words permuted within the client; random: words drawn from the federation's vocabulary")
    p.add_argument("--output_dir", type=Path, required=True)
    args = p.parse_args(argv)
    setup_logging()
    from fl_lib.data.corrupt import corrupt_clients

    corrupt_clients(args.clients, args.output_dir, args.num_corrupted, args.seed, args.mode)


if __name__ == "__main__":
    main()
