"""Stage 6 of egs/session_adapt: filter the pseudo-labels by confidence into one client per session.

    python -m fl_lib.bin.select_labels --sessions data/sessions/test-other/sessions.jsonl \\
        --config conf/adapt.yaml --hyps exp/adapt/gen1/labels/hyps.jsonl \\
        --confidence exp/adapt/gen1/labels/confidence.jsonl --output_dir exp/adapt/gen1/clients

With `labels: oracle` (the ablation's upper bound) pass --oracle_text instead of hypotheses.
Trailing `key=value` arguments override the adaptation config.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fl_lib.log import setup_logging


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=Path, required=True, help="sessions.jsonl of stage 2")
    p.add_argument("--config", type=Path, required=True, help="adaptation config (labels, filter)")
    p.add_argument("--hyps", type=Path, default=None, help="hyps.jsonl of stage 4")
    p.add_argument("--confidence", type=Path, default=None, help="confidence.jsonl of stage 5")
    p.add_argument("--oracle_text", type=Path, default=None, help="labels: oracle only: truth/adapt_text")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the adaptation config")
    args = p.parse_args(argv)
    setup_logging()
    from fl_lib.adapt.config import AdaptConfig
    from fl_lib.adapt.select import select_labels

    conf = AdaptConfig.from_yaml(args.config, args.overrides)
    select_labels(args.sessions, conf, args.output_dir, args.hyps, args.confidence, args.oracle_text)


if __name__ == "__main__":
    main()
