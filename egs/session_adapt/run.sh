#!/usr/bin/env bash
# Unsupervised federated session adaptation: a seed model adapts to each session's own
# unlabeled audio. One federated client per session (a voice the seed never heard).
#
# Without --corpus_dir, stage 0 synthesizes the sessions: held-out voices of the embedded
# corpus (conf/corpus.yaml, test-other). With --corpus_dir /path/to/LibriSpeech, any part
# (--session_part) serves, one session per speaker.
# The seed model comes from the librispeech_fl recipe (--seed_exp); stage 3 says what to
# run when there is none. Each session's audio is split, seeded, into an adaptation part,
# written without transcripts, a dev part (for choosing settings) and a test part (for
# reporting), which share no sentence; the adaptation truth sits in
# data/sessions/<part>/truth/ and only stage 8 (and the oracle ablation) reads it.
#
#   ./run.sh --seed_exp ../librispeech_fl/exp/fl_fedavg_train_asr_conformer_ctc
#   ./run.sh --stage 4 --seed_exp ... --adapt_config conf/adapt_beam.yaml     # an ablation run
#   ./run.sh --stage 4 --seed_exp ... --adapt_args "top_fraction=0.3" --fl_args "rounds=20"
#
# Stages 4-7 run once per generation (adapt config: generations). Everything under
# data/ and exp/ can be removed and regenerated.
set -euo pipefail

stage=0
stop_stage=8
nj=2
seed=1234
corpus_dir=                       # empty: synthesize the sessions
corpus_config=conf/corpus.yaml    # embedded sessions: voices, utterances per session
session_part=test-other           # the part whose speakers are the sessions
adapt_fraction=0.6                # share of each session's utterances to adapt on
dev_fraction=0.1                  # share of each session's utterances to choose settings on; the rest is its test part
min_duration=0.5
max_duration=20.0
seed_exp=                         # the seed's experiment dir, e.g. ../librispeech_fl/exp/fl_fedavg_train_asr_conformer_ctc
seed_model=valid.acc.best.pth     # weights in seed_exp
use_lm=true                       # label and test with the seed recipe's LM in shallow fusion (its decoding)
seed_lm_exp=                      # that LM's experiment dir; empty: lm_train_lm_rnn beside seed_exp
inference_config=                 # ESPnet decoding config; empty: decode_asr_ctc_fusion.yaml or decode_asr_ctc.yaml by --use_lm
adapt_config=conf/adapt.yaml      # labels, confidence, filter, generations
adapt_args=                       # key=value overrides of adapt_config, e.g. "top_fraction=0.3"
lm_text=                          # confidence k2_lm's n-gram text; empty: the seed LM's text (exp/seed/lm/text.txt)
fl_config=conf/fl_adapt.yaml      # rounds, DGA, client and server optimizers
student_config=conf/student_freeze_upper.yaml  # training-only settings: only the lower encoder adapts (chosen on dev); "": the whole model; conf/student_specaug.yaml: a noisy student
fl_args=                          # key=value overrides of fl_config, e.g. "rounds=20"
client_jobs=2                     # processes that train a round's clients in parallel
adapted_model=valid.acc.best.pth  # the adapted weights to decode: the best round on the dev parts, or latest.pth
tune_on_dev=false                 # choose the adapted round (among those kept) and the LM weight by decoding the dev parts as the test parts are
tune_lm_weights="1 2 3"           # --tune_on_dev true: LM weights tried, for the seed and the adapted model alike
wiseft_alphas="0.25 0.5 0.75"     # a pull towards the seed: interpolate the adapted model with it at these shares, keep the best on the dev parts (chosen on dev); "": none
tag=                              # experiment name; default from the configs
data=data
exp=exp

help_message=$(cat <<HELP
Usage: $0 [--option value] ...

Options:
  --stage            # first stage to run (default="${stage}")
  --stop_stage       # last stage to run (default="${stop_stage}")
  --nj               # parallel jobs of the data stages and of decoding (default="${nj}")
  --seed             # corpus synthesis, session split and training seed (default="${seed}")
  --corpus_dir       # LibriSpeech root; empty: synthesize the sessions (default="${corpus_dir}")
  --corpus_config    # embedded sessions: voices, utterances per session (default="${corpus_config}")
  --session_part     # the part whose speakers are the sessions (default="${session_part}")
  --adapt_fraction   # share of each session's utterances to adapt on (default="${adapt_fraction}")
  --dev_fraction     # share of each session's utterances to choose settings on (default="${dev_fraction}")
  --min_duration     # shortest usable utterance, seconds (default="${min_duration}")
  --max_duration     # longest usable utterance, seconds (default="${max_duration}")
  --seed_exp         # the seed model's experiment dir (default="${seed_exp}")
  --seed_model       # weights in seed_exp (default="${seed_model}")
  --use_lm           # label and test with the seed recipe's LM in shallow fusion (default="${use_lm}")
  --seed_lm_exp      # that LM's experiment dir; empty: lm_train_lm_rnn beside --seed_exp (default="${seed_lm_exp}")
  --inference_config # ESPnet decoding config, for labelling and testing; empty: by --use_lm (default="${inference_config}")
  --adapt_config     # labels, confidence, filter, generations (default="${adapt_config}")
  --adapt_args       # key=value overrides of adapt_config, in quotes (default="${adapt_args}")
  --lm_text          # confidence k2_lm's n-gram text; empty: the seed LM's text, exp/seed/lm/text.txt (default="${lm_text}")
  --fl_config        # federated adaptation: rounds, strategy, optimizers (default="${fl_config}")
  --fl_args          # key=value overrides of fl_config, in quotes (default="${fl_args}")
  --student_config   # training-only settings of the adapting model: SpecAugment, frozen parameters; empty: none (default="${student_config}")
  --client_jobs      # processes that train a round's clients in parallel (default="${client_jobs}")
  --adapted_model    # adapted weights to label (generation > 1) and test with: the best round on the dev parts, or latest.pth (default="${adapted_model}")
  --tune_on_dev      # choose the adapted round (of those kept) and the LM weight by decoding the dev parts with the test decoding (default="${tune_on_dev}")
  --tune_lm_weights  # --tune_on_dev true: LM weights tried, for the seed and the adapted model alike, in quotes (default="${tune_lm_weights}")
  --wiseft_alphas    # a pull towards the seed (WiSE-FT): the adapted model's shares in a weight interpolation with it, in quotes, e.g. "0.25 0.5 0.75"; the best of them and the adapted model on the dev parts is kept (default="${wiseft_alphas}")
  --tag              # experiment name; empty: from the configs (default="${tag}")
  --data             # where corpus, manifests and sessions go (default="${data}")
  --exp              # where the seed copy and experiments go (default="${exp}")
HELP
)

defaults_adapted_model=$adapted_model defaults_tune_lm_weights=$tune_lm_weights
. ./path.sh
. utils/parse_options.sh
if [ "$tune_on_dev" = true ] && [ "$adapted_model" != "$defaults_adapted_model" ]; then
  echo "$0: --adapted_model does nothing with --tune_on_dev true (the dev parts choose the round)" >&2; exit 1
fi
if { [ "$tune_on_dev" != true ] || [ "$use_lm" != true ]; } && [ "$tune_lm_weights" != "$defaults_tune_lm_weights" ]; then
  echo "$0: --tune_lm_weights does nothing without --tune_on_dev true and --use_lm true" >&2; exit 1
fi
if [ "$tune_on_dev" = true ] && [ -n "$wiseft_alphas" ]; then
  echo "$0: --tune_on_dev true and --wiseft_alphas choose the adapted model two ways: give --wiseft_alphas \"\" with --tune_on_dev true" >&2; exit 1
fi

log() {
  local fname=${BASH_SOURCE[1]##*/}
  echo -e "$(date '+%Y-%m-%d %H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]}) $*"
}

corpus=${corpus_dir:-$data/corpus/LibriSpeech}
sessions_dir=$data/sessions/$session_part
sessions=$sessions_dir/sessions.jsonl
seed_dir=$exp/seed
if [ -z "$tag" ]; then
  tag=$(basename "${adapt_config%.*}")_$(basename "${fl_config%.*}")
fi
expdir=$exp/$tag
if [ -z "$inference_config" ]; then
  if [ "$use_lm" = true ]; then inference_config=conf/decode_asr_ctc_fusion.yaml; else inference_config=conf/decode_asr_ctc.yaml; fi
fi
inference_tag=$(basename "${inference_config%.*}")
lm_args=()
if [ "$use_lm" = true ]; then
  seed_lm_exp=${seed_lm_exp:-$(dirname "${seed_exp:-.}")/lm_train_lm_rnn}
  lm_args=(--lm_train_config "$seed_dir/lm/config.yaml" --lm_file "$seed_dir/lm/model.pth")
  inference_tag+=_lm
fi
lm_text=${lm_text:-$seed_dir/lm/text.txt}
tune_args=()
if [ "$tune_on_dev" = true ] && [ "$use_lm" = true ]; then
  # shellcheck disable=SC2206
  tune_args=(--lm_weights $tune_lm_weights)
fi
# tune <exp_dir> <models> <output_dir>: the checkpoint and LM weight of lowest WER on the dev parts.
tune() {
  python -m fl_lib.bin.tune_decoding --exp_dir "$1" --models $2 --inference_config "$inference_config" \
    --cuts "$sessions_dir/dev.jsonl.gz" --nj "$nj" --output_dir "$3" "${tune_args[@]}" "${lm_args[@]}"
}
# Where the dev parts choose a generation's adapted model, if they do.
choice_dir() {  # choice_dir <gen>
  if [ "$tune_on_dev" = true ]; then echo "$expdir/gen$1/fl/tune_dev_$inference_tag"
  elif [ -n "$wiseft_alphas" ]; then echo "$expdir/gen$1/fl/wiseft_dev_$inference_tag"
  fi
}
# The adapted model of a generation, and the decoding it labels and is tested with.
adapted() {  # adapted <gen> -> sets adapted_exp, adapted_file, adapted_config
  adapted_exp=$expdir/gen$1/fl
  local chosen
  chosen=$(choice_dir "$1")
  if [ -n "$chosen" ]; then
    adapted_file=$chosen/model.pth; adapted_config=$chosen/decode.yaml
  else
    adapted_file=$adapted_model; adapted_config=$inference_config
  fi
}

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
  if [ -z "$corpus_dir" ]; then
    log "Stage 0: synthesize the sessions into $corpus"
    python -m fl_lib.bin.synthesize_corpus --config "$corpus_config" --output_dir "$corpus" --seed "$seed" --nj "$nj"
  else
    log "Stage 0: check the LibriSpeech layout of $corpus_dir"
    python -m fl_lib.bin.check_corpus --corpus_dir "$corpus_dir"
  fi
fi

if [ $stage -le 1 ] && [ $stop_stage -ge 1 ]; then
  log "Stage 1: Lhotse manifests of $corpus"
  python -m fl_lib.bin.prepare_manifests --corpus_dir "$corpus" --output_dir "$data/manifests" --nj "$nj"
fi

if [ $stage -le 2 ] && [ $stop_stage -ge 2 ]; then
  log "Stage 2: one client per session of $session_part: adaptation part (no transcripts), dev and test parts -> $sessions_dir"
  python -m fl_lib.bin.split_sessions \
    --cuts "$data/manifests/librispeech_cuts_${session_part}.jsonl.gz" --output_dir "$sessions_dir" \
    --adapt_fraction "$adapt_fraction" --dev_fraction "$dev_fraction" --seed "$seed" \
    --min_duration "$min_duration" --max_duration "$max_duration"
fi

if [ $stage -le 3 ] && [ $stop_stage -ge 3 ]; then
  log "Stage 3: check the seed model $seed_exp/$seed_model${seed_lm_exp:+ and its LM $seed_lm_exp} and copy them into $seed_dir"
  python -m fl_lib.bin.import_seed --seed_exp "$seed_exp" --model "$seed_model" --output_dir "$seed_dir" \
    ${seed_lm_exp:+--lm_exp "$seed_lm_exp"}
fi

if [ $stop_stage -ge 4 ] && [ $stage -le 7 ]; then
  # Checked before any decoding; saved into the experiment for stage 8.
  # shellcheck disable=SC2086
  values=$(python -m fl_lib.bin.adapt_config --config "$adapt_config" $adapt_args \
    --get generations,confidence,labels,ngram_order,lm_weight)
  { read -r generations; read -r confidence; read -r labels; read -r ngram_order; read -r lm_weight; } <<< "$values"
  if [ "$generations" -gt 1 ] && [ "$stage" -gt 4 ]; then
    # Generation g > 1 is labelled by generation g-1's adapted model, which this run would train
    # again: skipping g's stage 4 would adapt on the labels of an older model. Generation 1's
    # stage 4 (the seed's labels) is done once and returns at once.
    log "$generations generations: run from --stage 4 (later generations are labelled by the model this run trains)"; exit 1
  fi
  # shellcheck disable=SC2086
  python -m fl_lib.bin.adapt_config --config "$adapt_config" --save "$expdir/adapt_config.json" $adapt_args
  for gen in $(seq 1 "$generations"); do
    gendir=$expdir/gen$gen
    if [ "$gen" = 1 ]; then
      # The seed's labels are the same for every run on these sessions: labelled once, shared.
      teacher_dir=$seed_dir; teacher_model=model.pth; teacher_config=$inference_config
      labels_dir=$seed_dir/$inference_tag/labels_$session_part
    else
      adapted $((gen - 1))
      teacher_dir=$adapted_exp; teacher_model=$adapted_file; teacher_config=$adapted_config; labels_dir=$gendir/labels
    fi
    if [ $stage -le 4 ] && [ $stop_stage -ge 4 ]; then
      if [ "$labels" = oracle ]; then
        log "Stage 4 (generation $gen): labels: oracle, nothing to decode"
      else
        log "Stage 4 (generation $gen): pseudo-label the adaptation parts with $teacher_dir/$teacher_model -> $labels_dir"
        python -m fl_lib.bin.pseudo_label --sessions "$sessions" --exp_dir "$teacher_dir" --model "$teacher_model" \
          --inference_config "$teacher_config" --nj "$nj" --output_dir "$labels_dir" "${lm_args[@]}"
      fi
    fi
    if [ $stage -le 5 ] && [ $stop_stage -ge 5 ]; then
      if [ "$confidence" = None ]; then
        log "Stage 5 (generation $gen): no filter, no confidence to compute"
      else
        log "Stage 5 (generation $gen): $confidence confidence of the pseudo-labels -> $gendir/confidence.jsonl"
        mkdir -p "$gendir"
        grammar_args=()
        if [ "$confidence" = k2_lm ]; then
          # The n-gram of the text the seed recipe's LM learned, in the seed's tokens.
          if [ ! -f "$lm_text" ]; then
            log "confidence k2_lm needs the LM text $lm_text: run stage 3 with --use_lm true, or give --lm_text"; exit 1
          fi
          grammar_args=(--lm_text "$lm_text" --token_list "$seed_dir/tokens.txt" --bpemodel "$seed_dir/bpe.model"
            --ngram_order "$ngram_order" --lm_weight "$lm_weight")
        fi
        python -m fl_lib.bin.confidence --method "$confidence" --hyps "$labels_dir/hyps.jsonl" \
          --logp_scp "$labels_dir/logp.scp" --output "$gendir/confidence.jsonl" "${grammar_args[@]}"
      fi
    fi
    if [ $stage -le 6 ] && [ $stop_stage -ge 6 ]; then
      log "Stage 6 (generation $gen): filter the labels into one client per session -> $gendir/clients"
      if [ "$labels" = oracle ]; then
        inputs=(--oracle_text "$sessions_dir/truth/adapt_text")
      elif [ "$confidence" = None ]; then
        inputs=(--hyps "$labels_dir/hyps.jsonl")
      else
        inputs=(--hyps "$labels_dir/hyps.jsonl" --confidence "$gendir/confidence.jsonl")
      fi
      # shellcheck disable=SC2086
      python -m fl_lib.bin.select_labels --sessions "$sessions" --config "$adapt_config" "${inputs[@]}" \
        --output_dir "$gendir/clients" $adapt_args
    fi
    if [ $stage -le 7 ] && [ $stop_stage -ge 7 ]; then
      log "Stage 7 (generation $gen): federated adaptation from the seed, validated on the dev parts -> $gendir/fl (log: $gendir/fl/train.log)"
      mkdir -p "$gendir/fl"
      asr_config=$seed_dir/adapt_asr_config.yaml
      if [ -n "$student_config" ]; then
        asr_config=$expdir/asr_config.yaml
        python -m fl_lib.bin.student_config --seed_dir "$seed_dir" --student_config "$student_config" \
          --output "$asr_config"
      fi
      dev_args=()
      if [ "$(gzip -dc "$sessions_dir/dev.jsonl.gz" | wc -l)" -gt 0 ]; then
        dev_args=(--dev_cuts "$sessions_dir/dev.jsonl.gz")
      elif [ -n "$(choice_dir "$gen")" ]; then
        log "Stage 7: the sessions have no dev utterances (--dev_fraction) for --tune_on_dev or --wiseft_alphas to choose on; without them: --tune_on_dev false --wiseft_alphas \"\""; exit 1
      else
        log "Stage 7: the sessions have no dev utterances: no validation, the last round is the adapted model"
      fi
      # shellcheck disable=SC2086
      python -m fl_lib.bin.fl_train \
        --asr_config "$asr_config" --fl_config "$fl_config" \
        --train_clients "$gendir/clients/clients.jsonl" "${dev_args[@]}" \
        --token_list "$seed_dir/tokens.txt" --bpemodel "$seed_dir/bpe.model" \
        --feats_stats "$seed_dir/feats_stats.npz" --client_jobs "$client_jobs" \
        --seed "$seed" --output_dir "$gendir/fl" $fl_args 2>&1 | tee -a "$gendir/fl/train.log"
      if [ "$tune_on_dev" = true ]; then
        log "Stage 7 (generation $gen): choose the round kept and the LM weight on the dev parts with $inference_tag -> $gendir/fl/tune_dev_$inference_tag/TUNE.md"
        tune "$gendir/fl" kept "$gendir/fl/tune_dev_$inference_tag"
      elif [ -n "$wiseft_alphas" ]; then
        log "Stage 7 (generation $gen): interpolate $adapted_model with the seed at shares $wiseft_alphas; keep the best on the dev parts with $inference_tag -> $(choice_dir "$gen")/TUNE.md"
        # shellcheck disable=SC2086
        interpolations=$(python -m fl_lib.bin.interpolate_seed --exp_dir "$gendir/fl" --model "$adapted_model" \
          --seed_model "$seed_dir/model.pth" --alphas $wiseft_alphas)
        tune "$gendir/fl" "$adapted_model $interpolations" "$(choice_dir "$gen")"  # tune splits the names on any whitespace
      fi
    fi
  done
fi

if [ $stage -le 8 ] && [ $stop_stage -ge 8 ]; then
  generations=$(python -m fl_lib.bin.adapt_config --config "$expdir/adapt_config.json" --get generations)
  adapted "$generations"
  if [ -n "$(choice_dir "$generations")" ] && [ ! -f "$(choice_dir "$generations")/choice.json" ]; then
    log "Stage 8: $(choice_dir "$generations")/choice.json does not exist: run stage 7 with the same --tune_on_dev / --wiseft_alphas first"; exit 1
  fi
  log "Stage 8: decode the sessions' test parts with the seed and with $adapted_exp ($adapted_file); score"
  # decode_both <name> <seed tag> <tag> <seed config> <adapted config> [LM args]: the seed (once per
  # config, LM and sessions) and the adapted model.
  scores=()
  decode_both() {
    local name=$1 seed_tag=$2 tag=$3 seed_config=$4 config=$5; shift 5
    local seed_score=$seed_dir/$seed_tag/$session_part/score.json newest
    newest=$(ls -t "$seed_dir/model.pth" "$sessions" "$seed_config" ${4:+"$4"} | head -1)  # $4: the LM file
    if [ -f "$seed_score" ] && [ "$seed_score" -nt "$newest" ]; then
      log "Stage 8: $seed_score is newer than the seed, its LM, the decoding config and the sessions: not decoding the seed again"
    else
      python -m fl_lib.bin.decode --exp_dir "$seed_dir" --model model.pth --inference_config "$seed_config" \
        --cuts "$sessions_dir/test.jsonl.gz" --nj "$nj" --output_dir "$seed_dir/$seed_tag/$session_part" "$@"
    fi
    python -m fl_lib.bin.decode --exp_dir "$adapted_exp" --model "$adapted_file" \
      --inference_config "$config" --cuts "$sessions_dir/test.jsonl.gz" --nj "$nj" \
      --output_dir "$expdir/$tag/$session_part" "$@"
    scores+=(--scores "$name" "$seed_score" "$expdir/$tag/$session_part/score.json")
  }
  seed_config=$inference_config; decoding=$inference_tag; am_decoding=decode_asr_ctc
  if [ "$tune_on_dev" = true ]; then
    # The seed's LM weight is chosen on the same dev parts as the adapted model's (trials decoded
    # before are reused, and an unchanged choice leaves decode.yaml as it was).
    seed_tune=$seed_dir/tune_dev_$inference_tag/$session_part
    log "Stage 8: choose the seed's LM weight on the dev parts -> $seed_tune/TUNE.md"
    tune "$seed_dir" model.pth "$seed_tune"
    seed_config=$seed_tune/decode.yaml; decoding=${inference_tag}_tuned; am_decoding=decode_asr_ctc_tuned
  fi
  # The seed's acoustic model alone does not depend on the tuning: its untuned decode serves both.
  if [ "$use_lm" = true ]; then
    decode_both "LM fusion ($decoding)" "$decoding" "$decoding" "$seed_config" "$adapted_config" "${lm_args[@]}"
    decode_both "acoustic model alone" decode_asr_ctc "$am_decoding" conf/decode_asr_ctc.yaml conf/decode_asr_ctc.yaml
  else
    decode_both "$decoding" "$decoding" "$decoding" "$seed_config" "$adapted_config"
  fi
  choice_args=()
  if [ -n "$(choice_dir "$generations")" ]; then choice_args=(--adapted_choice "$(choice_dir "$generations")/choice.json"); fi
  python -m fl_lib.bin.session_results --sessions "$sessions" "${scores[@]}" --exp_dir "$expdir" \
    --wall_seconds "$SECONDS" --student_config "$student_config" --seed_dir "$seed_dir" "${choice_args[@]}"
  log "Results: $expdir/RESULTS.md"
fi
