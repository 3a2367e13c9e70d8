"""Stage 8 of egs/session_adapt: per-session WER table (seed vs adapted), pseudo-label WER, RESULTS.md.

    python -m fl_lib.bin.session_results --sessions data/sessions/test-other/sessions.jsonl \\
        --scores "LM fusion" exp/seed/decode_asr_ctc_fusion_lm/test-other/score.json \\
                 exp/adapt/decode_asr_ctc_fusion_lm/test-other/score.json \\
        --scores "acoustic model alone" exp/seed/decode_asr_ctc/test-other/score.json \\
                 exp/adapt/decode_asr_ctc/test-other/score.json --exp_dir exp/adapt

With --ablation, collect the summary.json of several runs into one table instead.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fl_lib.log import setup_logging


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=Path, help="sessions.jsonl of stage 2")
    p.add_argument("--scores", nargs=3, action="append", metavar=("DECODING", "SEED_SCORE", "ADAPTED_SCORE"),
                   help="a decoding's name, and the score.json of the seed and of the adapted model on the "
                        "test parts; repeated per decoding, the recipe's own first")
    p.add_argument("--exp_dir", type=Path, help="the adaptation experiment (gets summary.json, RESULTS.md)")
    p.add_argument("--wall_seconds", type=float, default=None, help="wall time of the run, for the record")
    p.add_argument("--student_config", default="", help="the run's student config, for the record (empty: none)")
    p.add_argument("--adapted_choice", type=Path, default=None,
                   help="choice.json of the dev tuning that chose the adapted model (tune_decoding), for the record")
    p.add_argument("--seed_dir", type=Path, default=None, help="stage 3's copy of the seed, whose identity is recorded")
    p.add_argument("--ablation", type=Path, nargs="+", default=None, help="experiment dirs to tabulate")
    p.add_argument("--output", type=Path, default=None, help="--ablation: the markdown file to write")
    args = p.parse_args(argv)
    setup_logging()
    from fl_lib.adapt.results import make_session_results, render_ablation

    if args.ablation:
        if args.output is None:
            p.error("--ablation needs --output")
        args.output.write_text(render_ablation(args.ablation), encoding="utf-8")
        logging.info("wrote %s", args.output)
        return
    missing = [k for k in ("sessions", "scores", "exp_dir") if getattr(args, k) is None]
    if missing:
        p.error(f"missing {', '.join('--' + k for k in missing)}")
    names = [name for name, _, _ in args.scores]
    if len(set(names)) != len(names):
        p.error(f"--scores names a decoding twice: {names}")
    decodings = {name: (Path(seed), Path(adapted)) for name, seed, adapted in args.scores}
    out = make_session_results(args.sessions, decodings, args.exp_dir, args.wall_seconds, args.student_config or None,
                               args.adapted_choice, args.seed_dir)
    logging.info("wrote %s", out)


if __name__ == "__main__":
    main()
