#!/usr/bin/env bash
# Convergence benchmark: FedAvg, FedAvg+server Adam, DGA+server Adam, RL-DGA+server Adam, DGA+server SGD and BMUF,
# tuned on dev, reported on test-clean, on a clean federation and one with 2 corrupted clients.
# Needs stages 0-4 of egs/librispeech_fl; results in bench/out/convergence/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -f "$root/egs/librispeech_fl/data/clients/train-clean-100/clients.jsonl" ]; then
  (cd "$root/egs/librispeech_fl" && ./run.sh --stage 0 --stop_stage 4)
fi
export OMP_NUM_THREADS=1
exec "$root/.venv/bin/python" "$root/bench/convergence.py" --config "$root/bench/convergence.yaml" "$@"
