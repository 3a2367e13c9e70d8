#!/usr/bin/env bash
# Choose the confidence filter on the sessions' dev parts: the seed labels the dev audio
# (as stage 4 labels the adaptation audio), every adaptation config computes its confidence
# and applies its filter (as stages 5-6), and exp/confidence_dev/CONFIDENCE_DEV.md gives the
# WER of the labels each filter keeps, and of those only one of two filters keeps.
# Run ./run.sh --stage 0 --stop_stage 3 --seed_exp ... first (data, seed and its LM).
#
#   ./confidence_dev.sh
#   ./confidence_dev.sh --configs "conf/adapt.yaml conf/adapt_k2_lm.yaml" --use_lm false
set -euo pipefail

configs="conf/adapt_beam.yaml conf/adapt.yaml conf/adapt_k2_lm.yaml"
use_lm=true             # label with the seed LM in shallow fusion, as run.sh does by default
inference_config=       # empty: decode_asr_ctc_fusion.yaml or decode_asr_ctc.yaml by --use_lm
lm_text=                # k2_lm's n-gram text; empty: the seed LM's text, exp/seed/lm/text.txt
session_part=test-other
nj=2
data=data
exp=exp

help_message=$(cat <<HELP
Usage: $0 [--option value] ...

Options:
  --configs          # adaptation configs with a filter, in quotes (default="${configs}")
  --use_lm           # label with the seed LM in shallow fusion (default="${use_lm}")
  --inference_config # ESPnet decoding config of the labels; empty: by --use_lm (default="${inference_config}")
  --lm_text          # k2_lm's n-gram text; empty: the seed LM's text, exp/seed/lm/text.txt (default="${lm_text}")
  --session_part     # the part whose speakers are the sessions (default="${session_part}")
  --nj               # parallel decoding jobs (default="${nj}")
  --data             # where the sessions are (default="${data}")
  --exp              # where the seed is and the comparison goes (default="${exp}")
HELP
)

. ./path.sh
. utils/parse_options.sh

seed_dir=$exp/seed
lm_args=()
if [ "$use_lm" = true ]; then
  inference_config=${inference_config:-conf/decode_asr_ctc_fusion.yaml}
  lm_args=(--lm_train_config "$seed_dir/lm/config.yaml" --lm_file "$seed_dir/lm/model.pth")
fi
inference_config=${inference_config:-conf/decode_asr_ctc.yaml}
for config in $configs; do
  if grep -q '^confidence: *k2_lm' "$config"; then lm_args+=(--lm_text "${lm_text:-$seed_dir/lm/text.txt}"); break; fi
done
# shellcheck disable=SC2086
python -m fl_lib.bin.confidence_dev --sessions "$data/sessions/$session_part/sessions.jsonl" \
  --seed_dir "$seed_dir" --inference_config "$inference_config" --configs $configs "${lm_args[@]}" \
  --nj "$nj" --output_dir "$exp/confidence_dev/$(basename "${inference_config%.*}")"
