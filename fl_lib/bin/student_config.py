"""Stage 7 of egs/session_adapt, with --student_config: the adapted model's ESPnet config,
the seed's plus training-only noise (SpecAugment) for a noisy student.

    python -m fl_lib.bin.student_config --seed_dir exp/seed --student_config conf/student_specaug.yaml \\
        --output exp/adapt/asr_config.yaml
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fl_lib.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed_dir", type=Path, required=True, help="exp/seed of stage 3")
    p.add_argument("--student_config", type=Path, required=True, help="YAML of specaug / specaug_conf")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    setup_logging()
    from fl_lib.adapt.seed import SeedError, student_asr_config

    try:
        student_asr_config(args.seed_dir, args.student_config, args.output)
    except SeedError as err:
        logging.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
