"""Command-line tools, one per recipe step: `python -m fl_lib.bin.<tool> --help`."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_lm_options(p: argparse.ArgumentParser) -> None:
    """--lm_train_config / --lm_file, as asr.sh passes an ESPnet LM to decoding (shallow fusion)."""
    p.add_argument("--lm_train_config", type=Path, default=None, help="an ESPnet LM's config.yaml (fl_lib.bin.train_lm)")
    p.add_argument("--lm_file", type=Path, default=None, help="that LM's checkpoint, e.g. valid.loss.best.pth")
