"""Stage 3 CLI: federated feature statistics for ESPnet's global_mvn."""
from __future__ import annotations

import argparse
from pathlib import Path
from fl_lib.log import setup_logging


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
    setup_logging()
    from fl_lib.features.stats import federated_feats_stats

    federated_feats_stats(args.clients, args.asr_config, args.output_dir)


if __name__ == "__main__":
    main()
