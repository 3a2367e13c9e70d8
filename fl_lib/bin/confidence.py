"""Stage 5: the confidence of every pseudo-label, as confidence.jsonl.

    python -m fl_lib.bin.confidence --method k2 --hyps exp/x/gen1/labels/hyps.jsonl \
        --logp_scp exp/x/gen1/labels/logp.scp --output exp/x/gen1/labels/confidence.jsonl

`--method k2` runs fl_lib.confidence.lattice in the k2 environment (`--k2_python`,
default $FL_K2_PYTHON). `--method k2_lm` first builds a token n-gram of `--lm_text`
in the seed's tokens (`--token_list`, `--bpemodel`, `--ngram_order`) and has the
lattice weigh it by `--lm_weight`: the posterior under CTC and LM together, which
the beam score of a CTC-only model is not. If the k2 environment is missing, the
beam score stands in,
and the log says so loudly. The table's rows record the method that made them, so
stage 6 refuses a fallback table when the adaptation config asks for k2; the
done-marker records whether k2 was available, so installing it after a fallback run
makes the stage run again.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
from pathlib import Path
from typing import Optional

from fl_lib.confidence.grammar import GrammarSpec, build_grammar
from fl_lib.confidence.tables import K2_METHODS, METHODS, table_method
from fl_lib.data.markers import file_stamp, is_done, mark_done
from fl_lib.log import setup_logging

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
# The rows' format, in the done-marker: a table of an older one is made again.
# 2: the k2 rows carry token_posteriors; 3: counted in windows of TOKEN_WINDOW frames.
ROW_FORMAT = 3


def k2_available(k2_python: Optional[str]) -> bool:
    """Whether the k2 environment's interpreter is there to run."""
    return bool(k2_python) and Path(k2_python).is_file() and os.access(k2_python, os.X_OK)


def compute_confidence(method: str, hyps: Path, logp_scp: Path, output: Path, k2_python: Optional[str],
                       grammar: Optional[GrammarSpec] = None) -> str:
    """Write `output`; return the method actually used (k2, k2_lm, or beam_score when k2 is unavailable).
    `grammar` is k2_lm's n-gram, and only k2_lm's."""
    from fl_lib.confidence.beam import beam_score_table

    if method not in METHODS:
        raise ValueError(f"unknown confidence method '{method}'; choose {', '.join(METHODS)}")
    if (method == "k2_lm") != (grammar is not None):
        raise ValueError(f"confidence {method} {'needs' if method == 'k2_lm' else 'takes no'} grammar "
                         f"(--lm_text, --token_list, --bpemodel, --ngram_order, --lm_weight)")
    uses_k2 = method in K2_METHODS
    used = method if uses_k2 and k2_available(k2_python) else "beam_score"
    done = output.with_name(output.name + ".done")
    stamp = {"hyps": file_stamp(hyps), "method": method, "used": used, "rows": ROW_FORMAT,
             "k2_python": k2_python if uses_k2 else None, "grammar": grammar.stamp() if grammar else None}
    if is_done(done, stamp, [output]):
        logger.info("%s already computed with %s (%s): skipping", output, used, done)
        return _checked(output, used)
    done.unlink(missing_ok=True)
    if used != "beam_score":
        cmd = [k2_python, "-m", "fl_lib.confidence.lattice", "--hyps", str(hyps), "--logp_scp", str(logp_scp),
               "--output", str(output)]
        if grammar:
            graph = output.with_name(output.stem + ".G.txt")
            build_grammar(grammar, graph)
            cmd += ["--grammar", str(graph), "--lm_weight", str(grammar.lm_weight)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        subprocess.run(cmd, env=env, check=True)
    else:
        if uses_k2:
            bar = "!" * 78
            logger.warning("%s\nk2 environment missing (%s): FALLING BACK to ESPnet's length-normalized beam "
                           "score as confidence.\nThe table says beam_score, and the filter refuses it while the "
                           "adaptation config says confidence: %s.\nRun `make install` to build .venv-k2 for the k2 "
                           "lattice posterior (this stage then runs again).\n%s", bar,
                           k2_python or "$FL_K2_PYTHON unset", method, bar)
        beam_score_table(hyps, output)
    _checked(output, used)
    mark_done(done, stamp)
    return used


def _checked(output: Path, used: str) -> str:
    """`used`, once the table's rows say that this method made them."""
    recorded = table_method(output)
    if recorded != used:
        raise RuntimeError(f"{output} says its confidences were made by {recorded}, but {used} ran")
    return used


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--hyps", type=Path, required=True, help="hyps.jsonl of stage 4")
    p.add_argument("--logp_scp", type=Path, required=True, help="CTC log-posteriors of stage 4 (Kaldi scp)")
    p.add_argument("--output", type=Path, required=True, help="confidence.jsonl to write")
    p.add_argument("--k2_python", default=os.environ.get("FL_K2_PYTHON"), help="python of .venv-k2")
    g = p.add_argument_group("k2_lm only: the token n-gram in the lattice")
    g.add_argument("--lm_text", type=Path, help="LM corpus, one sentence per line (the seed recipe's)")
    g.add_argument("--token_list", type=Path, help="the seed's tokens.txt")
    g.add_argument("--bpemodel", type=Path, help="the seed's sentencepiece model; none: ESPnet's char tokens")
    g.add_argument("--ngram_order", type=int)
    g.add_argument("--lm_weight", type=float)
    args = p.parse_args(argv)
    setup_logging()
    grammar_args = (args.lm_text, args.token_list, args.bpemodel, args.ngram_order, args.lm_weight)
    if args.method == "k2_lm":
        if any(a is None for i, a in enumerate(grammar_args) if i != 2):
            p.error("--method k2_lm needs --lm_text, --token_list, --ngram_order and --lm_weight")
        grammar = GrammarSpec(*grammar_args)
    elif any(a is not None for a in grammar_args):
        p.error(f"--lm_text, --token_list, --bpemodel, --ngram_order and --lm_weight do nothing with "
                f"--method {args.method}; they are k2_lm's")
    else:
        grammar = None
    used = compute_confidence(args.method, args.hyps, args.logp_scp, args.output, args.k2_python, grammar)
    logger.info("confidence (%s) -> %s", used, args.output)


if __name__ == "__main__":
    main()
