"""Stage 8 of egs/session_adapt: per-session WER table (seed vs adapted), pseudo-label WER, RESULTS.md.

    python -m fl_lib.bin.session_results --sessions data/sessions/test-other/sessions.jsonl \\
        --seed_score exp/seed/decode_asr_ctc/test/score.json \\
        --adapted_score exp/adapt/decode_asr_ctc/test/score.json --exp_dir exp/adapt

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
    p.add_argument("--seed_score", type=Path, help="score.json of the seed on the test parts")
    p.add_argument("--adapted_score", type=Path, help="score.json of the adapted model on the test parts")
    p.add_argument("--exp_dir", type=Path, help="the adaptation experiment (gets summary.json, RESULTS.md)")
    p.add_argument("--wall_seconds", type=float, default=None, help="wall time of the run, for the record")
    p.add_argument("--student_config", default="", help="the run's student config, for the record (empty: none)")
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
    missing = [k for k in ("sessions", "seed_score", "adapted_score", "exp_dir") if getattr(args, k) is None]
    if missing:
        p.error(f"missing {', '.join('--' + k for k in missing)}")
    out = make_session_results(args.sessions, args.seed_score, args.adapted_score, args.exp_dir, args.wall_seconds,
                               args.student_config or None)
    logging.info("wrote %s", out)


if __name__ == "__main__":
    main()
