"""Stage 3 CLI: federated feature statistics for ESPnet's global_mvn."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Each client sums the frontend features of its own audio; "
        "the server adds the sums into ESPnet's feats_stats.npz.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--clients", type=Path, required=True, help="clients.jsonl of stage 2")
    parser.add_argument(
        "--asr_config", type=Path, required=True, help="ESPnet asr_config (frontend, frontend_conf)"
    )
    parser.add_argument(
        "--output_dir", type=Path, required=True,
        help="gets clients/<id>.npz and feats_stats.npz",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s",
    )
    from fl_lib.features.stats import federated_feats_stats

    federated_feats_stats(args.clients, args.asr_config, args.output_dir)


if __name__ == "__main__":
    main()
