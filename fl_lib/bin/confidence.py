"""Stage 5: the confidence of every pseudo-label, as confidence.jsonl.

    python -m fl_lib.bin.confidence --method k2 --hyps exp/x/gen1/labels/hyps.jsonl \
        --logp_scp exp/x/gen1/labels/logp.scp --output exp/x/gen1/labels/confidence.jsonl

`--method k2` runs fl_lib.confidence.lattice in the k2 environment (`--k2_python`,
default $FL_K2_PYTHON). If that environment is missing, the beam score stands in,
and the log says so loudly: the filter then ranks by another quantity.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
from pathlib import Path

from fl_lib.confidence.tables import METHODS
from fl_lib.data.markers import file_stamp, is_done, mark_done
from fl_lib.log import setup_logging

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


def compute_confidence(method: str, hyps: Path, logp_scp: Path, output: Path, k2_python: str | None) -> str:
    """Write `output`; return the method actually used (k2, or beam_score when k2 is unavailable)."""
    from fl_lib.confidence.beam import beam_score_table

    if method not in METHODS:
        raise ValueError(f"unknown confidence method '{method}'; choose {', '.join(METHODS)}")
    done = output.with_name(output.name + ".done")
    stamp = {"hyps": file_stamp(hyps), "method": method, "k2_python": k2_python}
    if is_done(done, stamp, [output]):
        logger.info("%s already computed (%s): skipping", output, done)
        return _used(output)
    done.unlink(missing_ok=True)
    used = method
    if method == "k2":
        if k2_python and Path(k2_python).is_file() and os.access(k2_python, os.X_OK):
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
            subprocess.run([k2_python, "-m", "fl_lib.confidence.lattice", "--hyps", str(hyps),
                            "--logp_scp", str(logp_scp), "--output", str(output)], env=env, check=True)
        else:
            bar = "!" * 78
            logger.warning("%s\nk2 environment missing (%s): FALLING BACK to ESPnet's length-normalized beam "
                           "score as confidence.\nRun `make install` to build .venv-k2 for the k2 lattice "
                           "posterior.\n%s", bar, k2_python or "$FL_K2_PYTHON unset", bar)
            used = "beam_score"
    if used == "beam_score":
        beam_score_table(hyps, output)
    mark_done(done, stamp)
    return used


def _used(output: Path) -> str:
    """The method a confidence table was made with (its rows say)."""
    from fl_lib.confidence.tables import read_jsonl

    rows = read_jsonl(output)
    return rows[0]["method"] if rows else "none"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--hyps", type=Path, required=True, help="hyps.jsonl of stage 4")
    p.add_argument("--logp_scp", type=Path, required=True, help="CTC log-posteriors of stage 4 (Kaldi scp)")
    p.add_argument("--output", type=Path, required=True, help="confidence.jsonl to write")
    p.add_argument("--k2_python", default=os.environ.get("FL_K2_PYTHON"), help="python of .venv-k2")
    args = p.parse_args(argv)
    setup_logging()
    used = compute_confidence(args.method, args.hyps, args.logp_scp, args.output, args.k2_python)
    logger.info("confidence (%s) -> %s", used, args.output)


if __name__ == "__main__":
    main()
