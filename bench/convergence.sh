#!/usr/bin/env bash
# Convergence study: FedAvg, hierarchical optimization (server Adam), DGA + server Adam, BMUF and
# RL-DGA on a 64-speaker federation (K = 8), tuned on dev with a seed that is not reported, each
# run trained until its dev WER flattens, reported on test-clean over 3 seeds with 95 % intervals.
# It synthesizes and prepares its own corpora (bench/out/convergence/corpus_s<seed>/); run
# directories go to bench/out/convergence/, compact records and the report to
# bench/results/convergence/. A rerun trains only the runs without a committed record.
# Exit status 1 when the study does not count (bench/convergence.py's rules).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export OMP_NUM_THREADS=1
exec "$root/.venv/bin/python" "$root/bench/convergence.py" --config "$root/bench/convergence.yaml" "$@"
