#!/usr/bin/env bash
# Choose the confidence filter on the sessions' dev parts: the seed labels the dev audio
# (as stage 4 labels the adaptation audio), every adaptation config computes its confidence
# and applies its filter (as stages 5-6), and exp/confidence_dev/CONFIDENCE_DEV.md gives the
# WER of the labels each filter keeps, and of those only one of two filters keeps.
# Run ./run.sh --stage 0 --stop_stage 3 --seed_exp ... first (data and seed).
#
#   ./confidence_dev.sh --seed_exp ../librispeech_fl/exp/fl_fedavg_train_asr_conformer_ctc
#   ./confidence_dev.sh --seed_exp ... --configs "conf/adapt.yaml conf/adapt_k2_lm.yaml"
set -euo pipefail

seed_exp=
configs="conf/adapt_beam.yaml conf/adapt.yaml conf/adapt_k2_lm.yaml"
inference_config=conf/decode_asr_ctc.yaml
lm_text=                # k2_lm's n-gram text; empty: <seed recipe>/data/corpus/LibriSpeech/librispeech-lm-norm.txt
session_part=test-other
nj=2
data=data
exp=exp

help_message=$(cat <<HELP
Usage: $0 --seed_exp DIR [--option value] ...

Options:
  --seed_exp         # the seed model's experiment dir, for the default --lm_text (default="${seed_exp}")
  --configs          # adaptation configs with a filter, in quotes (default="${configs}")
  --inference_config # ESPnet decoding config of the labels (default="${inference_config}")
  --lm_text          # k2_lm's n-gram text; empty: the seed recipe's embedded LM text (default="${lm_text}")
  --session_part     # the part whose speakers are the sessions (default="${session_part}")
  --nj               # parallel decoding jobs (default="${nj}")
  --data             # where the sessions are (default="${data}")
  --exp              # where the seed is and the comparison goes (default="${exp}")
HELP
)

. ./path.sh
. utils/parse_options.sh

if [ -z "$lm_text" ]; then
  if [ -z "$seed_exp" ]; then
    echo "$0: give --seed_exp (its recipe's LM text is the n-gram text) or --lm_text" >&2; exit 1
  fi
  lm_text=$(dirname "$(dirname "$seed_exp")")/data/corpus/LibriSpeech/librispeech-lm-norm.txt
fi
lm_args=()
for config in $configs; do
  if grep -q '^confidence: *k2_lm' "$config"; then lm_args=(--lm_text "$lm_text"); fi
done
# shellcheck disable=SC2086
python -m fl_lib.bin.confidence_dev --sessions "$data/sessions/$session_part/sessions.jsonl" \
  --seed_dir "$exp/seed" --inference_config "$inference_config" --configs $configs "${lm_args[@]}" \
  --nj "$nj" --output_dir "$exp/confidence_dev"
