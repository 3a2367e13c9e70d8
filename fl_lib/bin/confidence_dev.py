"""Choose the confidence filter on the sessions' dev parts (egs/session_adapt/confidence_dev.sh).

    python -m fl_lib.bin.confidence_dev --sessions data/sessions/test-other/sessions.jsonl \\
        --seed_dir exp/seed --inference_config conf/decode_asr_ctc_fusion.yaml \\
        --lm_train_config exp/seed/lm/config.yaml --lm_file exp/seed/lm/model.pth \\
        --configs conf/adapt.yaml conf/adapt_beam.yaml conf/adapt_k2_lm.yaml \\
        --lm_text exp/seed/lm/text.txt --output_dir exp/confidence_dev/decode_asr_ctc_fusion

Labels the dev parts with the seed (as stage 4), computes each config's confidence
(as stage 5; a k2 method that would fall back to the beam score is an error here),
and writes CONFIDENCE_DEV.md: the WER of the labels each filter keeps and drops,
and of those only one of two filters keeps.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from fl_lib.bin import add_lm_options
from fl_lib.log import setup_logging


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=Path, required=True, help="sessions.jsonl of stage 2")
    p.add_argument("--seed_dir", type=Path, required=True, help="the seed of stage 3 (config.yaml, model.pth)")
    p.add_argument("--model", default="model.pth", help="weights in seed_dir")
    p.add_argument("--inference_config", type=Path, required=True, help="ESPnet decode yaml of the labels")
    p.add_argument("--configs", type=Path, nargs="+", required=True, help="adaptation configs with a filter")
    p.add_argument("--lm_text", type=Path, help="the n-gram text of k2_lm configs")
    add_lm_options(p)
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--nj", type=int, default=1, help="parallel decoding processes")
    p.add_argument("--k2_python", default=os.environ.get("FL_K2_PYTHON"), help="python of .venv-k2")
    args = p.parse_args(argv)
    setup_logging()
    from fl_lib.adapt.config import AdaptConfig
    from fl_lib.adapt.confidence_dev import Variant, compare, dev_truth, write
    from fl_lib.adapt.pseudo import pseudo_label
    from fl_lib.bin.confidence import compute_confidence
    from fl_lib.confidence.grammar import GrammarSpec

    configs = {path.stem: AdaptConfig.from_yaml(path) for path in args.configs}
    unfiltered = [name for name, c in configs.items() if c.filter == "none"]
    if unfiltered or len(configs) != len(args.configs):
        p.error(f"every config needs a filter and its own file name; no filter: {unfiltered}")
    if args.lm_text and not any(c.confidence == "k2_lm" for c in configs.values()):
        p.error("--lm_text does nothing: no config has confidence: k2_lm")
    labels = args.output_dir / "labels"
    hyps = pseudo_label(args.sessions, args.seed_dir, args.model, args.inference_config, labels, args.nj, part="dev",
                        lm_train_config=args.lm_train_config, lm_file=args.lm_file)
    variants = []
    for name, conf in configs.items():
        grammar = None
        if conf.confidence == "k2_lm":
            if not args.lm_text:
                p.error(f"{name} has confidence: k2_lm: give --lm_text")
            grammar = GrammarSpec(args.lm_text, args.seed_dir / "tokens.txt", args.seed_dir / "bpe.model",
                                  conf.ngram_order, conf.lm_weight)
        table = args.output_dir / name / "confidence.jsonl"
        table.parent.mkdir(parents=True, exist_ok=True)
        used = compute_confidence(conf.confidence, hyps, labels / "logp.scp", table, args.k2_python, grammar)
        if used != conf.confidence:
            raise SystemExit(f"{name}: {conf.confidence} confidence fell back to {used}: run `make install`")
        variants.append(Variant(name, conf, table))
    print(write(compare(hyps, dev_truth(args.sessions), variants), args.output_dir).read_text())


if __name__ == "__main__":
    main()
