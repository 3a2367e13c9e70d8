"""Decode and score one cut set with an experiment's model (run.sh stage 6).

    python -m fl_lib.bin.decode --exp_dir exp/fl_dga --model valid.acc.ave_5best.pth \
        --inference_config conf/decode_asr.yaml --cuts data/sets/dev-clean.jsonl.gz \
        --nj 2 --output_dir exp/fl_dga/decode_valid.acc.ave_5best/dev-clean
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fl_lib.bin import add_lm_options
from fl_lib.log import setup_logging
from fl_lib.terminate import EXIT_STATUS, Terminated, sigterm_raises


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp_dir", type=Path, required=True, help="holds config.yaml and the checkpoints")
    p.add_argument("--model", default="valid.acc.best.pth",
                   help="best (valid.acc.best.pth), latest, <N>round.pth, any file in exp_dir, or "
                        "ave / valid.acc.ave[_<N>best].pth to average the (N best) kept round checkpoints")
    p.add_argument("--inference_config", type=Path, required=True, help="ESPnet decode yaml")
    p.add_argument("--cuts", type=Path, required=True, help="Lhotse CutSet manifest (jsonl.gz)")
    p.add_argument("--output_dir", type=Path, required=True)
    add_lm_options(p)
    p.add_argument("--nj", type=int, default=1, help="parallel decoding processes")
    p.add_argument("--ngpu", type=int, default=0, help="0: decode on the CPU; 1: every worker on the GPU (an error without CUDA)")
    p.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    setup_logging(args.log_level)
    from fl_lib.asr.decode import decode_cuts
    from fl_lib.fl.checkpoint import CheckpointError
    from fl_lib.fl.distributed import resolve_device

    try:
        device = resolve_device(args.ngpu)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"decode: {e}") from None
    try:
        with sigterm_raises():
            decode_cuts(args.exp_dir, args.model, args.inference_config, args.cuts, args.output_dir,
                        nj=args.nj, device=str(device), lm_train_config=args.lm_train_config, lm_file=args.lm_file)
    except (ValueError, CheckpointError) as e:
        raise SystemExit(f"decode: {e}") from None
    except Terminated:  # the worker pool is terminated on the way out, and no score.json is left half-written
        logging.getLogger(__name__).error(f"decode: stopped by SIGTERM; {args.output_dir} has no score.json: rerun the same command")
        raise SystemExit(EXIT_STATUS) from None


if __name__ == "__main__":
    main()
