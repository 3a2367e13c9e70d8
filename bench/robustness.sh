#!/usr/bin/env bash
# The attack table (bench/robustness.py): each aggregation rule under each attack.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export OMP_NUM_THREADS=1
exec "$root/.venv/bin/python" "$root/bench/robustness.py" --config "$root/bench/robustness.yaml" "$@"
