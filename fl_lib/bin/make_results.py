"""Write <exp_dir>/RESULTS.md from decoded sets and training metrics (run.sh stage 6).

    python -m fl_lib.bin.make_results --exp_dir exp/fl_dga \
        --decode_dir exp/fl_dga/decode_valid.acc.best

Each subdirectory of a decode dir that holds score.json is one set.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from fl_lib.log import setup_logging



def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp_dir", type=Path, required=True, help="holds metrics.jsonl, asr_config.yaml, fl_config.yaml")
    p.add_argument("--decode_dir", type=Path, nargs="+", required=True, help="one or more decode_<model> dirs")
    p.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    setup_logging(args.log_level)
    from fl_lib.asr.results import make_results

    out = make_results(args.exp_dir, args.decode_dir)
    logging.getLogger(__name__).info("wrote %s", out)


if __name__ == "__main__":
    main()
