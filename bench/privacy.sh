#!/usr/bin/env bash
# The privacy-utility table (bench/privacy.py): DP-FedAvg's WER against ε, and ε on paper.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export OMP_NUM_THREADS=1
exec "$root/.venv/bin/python" "$root/bench/privacy.py" --config "$root/bench/privacy.yaml" "$@"
