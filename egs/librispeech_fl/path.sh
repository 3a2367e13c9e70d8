# Puts the toolkit's virtual environments on PATH. Sourced by run.sh.
FL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export FL_ROOT
if [ ! -x "$FL_ROOT/.venv/bin/python" ]; then
  echo "fl_lib is not installed: run 'make install' in $FL_ROOT" >&2
  exit 1
fi
export PATH="$FL_ROOT/.venv/bin:$PATH"
# k2 lives in its own python3.9 environment (its wheels need torch 1.13.1).
export FL_K2_PYTHON="$FL_ROOT/.venv-k2/bin/python"
export PYTHONUNBUFFERED=1
# nltk (imported by ESPnet) must not try to download at import time.
export NLTK_DATA="${NLTK_DATA:-$FL_ROOT/.venv/nltk_data}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
