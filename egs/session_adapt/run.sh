#!/usr/bin/env bash
# Session adaptation data: one federated client per held-out session (speaker).
#
# The held-out voices of the embedded corpus (test-other) play the sessions that a
# seed model trained in egs/librispeech_fl has never heard; stage 2 writes one
# client manifest per session. The unsupervised stages (pseudo-labelling with the
# seed model, confidence filtering, federated adaptation) build on these manifests
# and are not part of this recipe yet.
#
#   ./run.sh --stage 0 --stop_stage 2
set -euo pipefail

stage=0
stop_stage=2
nj=2
seed=1234
corpus_dir=                       # empty: reuse/synthesize the embedded corpus
corpus_config=conf/corpus.yaml
session_part=test-other
min_duration=0.5
max_duration=20.0
data=data

. ./path.sh
. utils/parse_options.sh

log() {
  local fname=${BASH_SOURCE[1]##*/}
  echo -e "$(date '+%Y-%m-%d %H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]}) $*"
}

corpus=${corpus_dir:-$data/corpus/LibriSpeech}

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
  if [ -z "$corpus_dir" ]; then
    log "Stage 0: synthesize the embedded corpus into $corpus"
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
  log "Stage 2: one client per session of $session_part"
  python -m fl_lib.bin.split_clients \
    --cuts "$data/manifests/librispeech_cuts_${session_part}.jsonl.gz" \
    --output_dir "$data/sessions/$session_part" \
    --min_utts 1 --min_duration "$min_duration" --max_duration "$max_duration"
fi
