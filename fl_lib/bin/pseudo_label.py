"""Stage 4 of egs/session_adapt: decode every session's adaptation audio with a teacher model
(`--part dev`: its dev audio, to choose the confidence filter where the truth is known).

    python -m fl_lib.bin.pseudo_label --sessions data/sessions/test-other/sessions.jsonl \\
        --exp_dir exp/seed --model model.pth --inference_config conf/decode_asr_ctc.yaml \\
        --nj 2 --output_dir exp/adapt/gen1/labels

Writes hyps.jsonl (hypotheses, token ids, beam scores) and logp.ark/scp (CTC log-posteriors).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fl_lib.bin import add_lm_options
from fl_lib.log import setup_logging


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=Path, required=True, help="sessions.jsonl of stage 2")
    p.add_argument("--exp_dir", type=Path, required=True, help="the teacher: config.yaml and weights")
    p.add_argument("--model", required=True, help="weights in exp_dir (names as fl_lib.bin.decode takes)")
    p.add_argument("--inference_config", type=Path, required=True, help="ESPnet decode yaml")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--nj", type=int, default=1, help="parallel decoding processes")
    p.add_argument("--part", choices=("adapt", "dev"), default="adapt", help="which part of every session")
    add_lm_options(p)
    args = p.parse_args(argv)
    setup_logging()
    from fl_lib.adapt.pseudo import pseudo_label

    pseudo_label(args.sessions, args.exp_dir, args.model, args.inference_config, args.output_dir, args.nj, args.part,
                 args.lm_train_config, args.lm_file)


if __name__ == "__main__":
    main()
