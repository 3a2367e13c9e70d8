"""Choose a checkpoint and LM weight on a dev set with the decoding that will be reported
(egs/session_adapt stage 7, with --tune_on_dev true).

    python -m fl_lib.bin.tune_decoding --exp_dir exp/adapt/gen1/fl --models kept \\
        --inference_config conf/decode_asr_ctc_fusion.yaml --lm_weights 1 2 3 \\
        --lm_train_config exp/seed/lm/config.yaml --lm_file exp/seed/lm/model.pth \\
        --cuts data/sessions/test-other/dev.jsonl.gz --nj 2 --output_dir exp/adapt/gen1/fl/tune_dev

Writes the chosen checkpoint (model.pth), its decoding config (decode.yaml), every trial's dev
WER (TUNE.md, trials.jsonl) and, last, choice.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fl_lib.bin import add_lm_options
from fl_lib.log import setup_logging


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp_dir", type=Path, required=True, help="holds config.yaml and the checkpoints")
    p.add_argument("--models", nargs="+", default=["kept"],
                   help="checkpoints to try: 'kept' (every <N>round.pth kept), or names as decode's --model")
    p.add_argument("--inference_config", type=Path, required=True, help="ESPnet decode yaml, as the test set is decoded")
    p.add_argument("--lm_weights", type=float, nargs="*", default=[],
                   help="LM weights to try (none: the config's own)")
    p.add_argument("--cuts", type=Path, required=True, help="the dev set, a Lhotse CutSet manifest (jsonl.gz)")
    p.add_argument("--output_dir", type=Path, required=True)
    add_lm_options(p)
    p.add_argument("--nj", type=int, default=1, help="parallel decoding processes")
    p.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    setup_logging(args.log_level)
    from fl_lib.asr.tune_decoding import tune_decoding
    from fl_lib.fl.checkpoint import CheckpointError

    try:
        tune_decoding(args.exp_dir, args.models, args.inference_config, args.cuts, args.output_dir,
                      lm_weights=args.lm_weights, nj=args.nj, lm_train_config=args.lm_train_config,
                      lm_file=args.lm_file)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        raise SystemExit(f"tune_decoding: {e}") from None


if __name__ == "__main__":
    main()
