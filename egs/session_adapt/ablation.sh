#!/usr/bin/env bash
# The ablation of the session-adaptation recipe: one run.sh run (stages 4-8) per labelling
# variant on the same sessions and seed, then one table of all of them (exp/ABLATION.md).
# Run ./run.sh --stage 0 --stop_stage 3 --seed_exp ... first (data and seed).
#
#   ./ablation.sh --seed_exp ../librispeech_fl/exp/fl_fedavg_train_asr_conformer_ctc
#   ./ablation.sh --seed_exp ... --configs "conf/adapt_nofilter.yaml conf/adapt.yaml"
set -euo pipefail

seed_exp=
configs="conf/adapt_nofilter.yaml conf/adapt_beam.yaml conf/adapt.yaml conf/adapt_k2_gen2.yaml conf/adapt_oracle.yaml"
fl_config=conf/fl_adapt.yaml
fl_args=                # key=value overrides of fl_config for every run, e.g. "rounds=20"
exp=exp
output=                 # the table; empty: $exp/ABLATION.md

help_message=$(cat <<HELP
Usage: $0 --seed_exp DIR [--option value] ...

Options:
  --seed_exp   # the seed model's experiment dir (default="${seed_exp}")
  --configs    # adaptation configs, one run each, in quotes (default="${configs}")
  --fl_config  # federated adaptation config of every run (default="${fl_config}")
  --fl_args    # key=value overrides of fl_config, in quotes (default="${fl_args}")
  --exp        # where the experiments go (default="${exp}")
  --output     # the table; empty: \$exp/ABLATION.md (default="${output}")
HELP
)

. ./path.sh
. utils/parse_options.sh

dirs=()
for config in $configs; do
  tag=$(basename "${config%.*}")_$(basename "${fl_config%.*}")
  ./run.sh --stage 4 --stop_stage 8 --seed_exp "$seed_exp" --adapt_config "$config" \
    --fl_config "$fl_config" --fl_args "$fl_args" --exp "$exp" --tag "$tag"
  dirs+=("$exp/$tag")
done
python -m fl_lib.bin.session_results --ablation "${dirs[@]}" --output "${output:-$exp/ABLATION.md}"
