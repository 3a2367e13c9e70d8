"""Stage 5: the confidence of every pseudo-label, as confidence.jsonl.

    python -m fl_lib.bin.confidence --method k2 --hyps exp/x/gen1/labels/hyps.jsonl \
        --logp_scp exp/x/gen1/labels/logp.scp --output exp/x/gen1/labels/confidence.jsonl

`--method k2` runs fl_lib.confidence.lattice in the k2 environment (`--k2_python`,
default $FL_K2_PYTHON). If that environment is missing, the beam score stands in,
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

from fl_lib.confidence.tables import METHODS, table_method
from fl_lib.data.markers import file_stamp, is_done, mark_done
from fl_lib.log import setup_logging

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


def k2_available(k2_python: Optional[str]) -> bool:
    """Whether the k2 environment's interpreter is there to run."""
    return bool(k2_python) and Path(k2_python).is_file() and os.access(k2_python, os.X_OK)


def compute_confidence(method: str, hyps: Path, logp_scp: Path, output: Path, k2_python: Optional[str]) -> str:
    """Write `output`; return the method actually used (k2, or beam_score when k2 is unavailable)."""
    from fl_lib.confidence.beam import beam_score_table

    if method not in METHODS:
        raise ValueError(f"unknown confidence method '{method}'; choose {', '.join(METHODS)}")
    used = "k2" if method == "k2" and k2_available(k2_python) else "beam_score"
    done = output.with_name(output.name + ".done")
    stamp = {"hyps": file_stamp(hyps), "method": method, "used": used,
             "k2_python": k2_python if method == "k2" else None}
    if is_done(done, stamp, [output]):
        logger.info("%s already computed with %s (%s): skipping", output, used, done)
        return _checked(output, used)
    done.unlink(missing_ok=True)
    if used == "k2":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([k2_python, "-m", "fl_lib.confidence.lattice", "--hyps", str(hyps),
                        "--logp_scp", str(logp_scp), "--output", str(output)], env=env, check=True)
    else:
        if method == "k2":
            bar = "!" * 78
            logger.warning("%s\nk2 environment missing (%s): FALLING BACK to ESPnet's length-normalized beam "
                           "score as confidence.\nThe table says beam_score, and the filter refuses it while the "
                           "adaptation config says confidence: k2.\nRun `make install` to build .venv-k2 for the k2 "
                           "lattice posterior (this stage then runs again).\n%s", bar,
                           k2_python or "$FL_K2_PYTHON unset", bar)
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
    args = p.parse_args(argv)
    setup_logging()
    used = compute_confidence(args.method, args.hyps, args.logp_scp, args.output, args.k2_python)
    logger.info("confidence (%s) -> %s", used, args.output)


if __name__ == "__main__":
    main()
