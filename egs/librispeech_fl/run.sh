#!/usr/bin/env bash
# Federated ASR on LibriSpeech-layout data: one federated client per speaker.
#
# Without --corpus_dir, stage 0 synthesizes the embedded corpus: synthetic
# speech from Debian TTS voices (flite, festival, espeak-ng) that were built
# from real people's recordings, written in LibriSpeech's exact layout. With
# --corpus_dir /path/to/LibriSpeech (the directory that holds train-clean-100/,
# dev-clean/, test-clean/ ...) the same stages run on the real corpus.
#
# Stages: 0 corpus (synthesize or check), 1 Lhotse manifests, 2 one client per speaker,
# 3 federated feature statistics, 4 tokenizer and LM, 5 federated training,
# 6 decoding and RESULTS.md, 7 packing the decoded model for stock Speech2Text.
#
#   ./run.sh --stage 0 --stop_stage 7
#   ./run.sh --corpus_dir /data/LibriSpeech --asr_config conf/train_asr_conformer_librispeech.yaml
#   ./run.sh --stage 5 --stop_stage 5 --fl_config conf/fl_fedavg.yaml --fl_args "rounds=20 server_optim.lr=1.0"
#   ./run.sh --stage 5 --stop_stage 5 --nproc 2 --client_jobs 1     # torchrun: 2 ranks share each round's clients
#   ./run.sh --stage 5 --stop_stage 5 --backend flower-grpc --flower_nodes 4   # over Flower: a SuperLink, 4 SuperNodes
#   ./run.sh --stage 5 --stop_stage 5 --backend flower-sim                     # Flower's simulation engine (Ray)
#   ./run.sh --nproc 8 --ngpu 1 --dist_args "--nnodes 2 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint host0:29400"
#
# Everything under data/ and exp/ can be removed and regenerated.
set -euo pipefail

stage=0
stop_stage=7
nj=2
seed=1234
corpus_dir=                        # empty: synthesize the embedded corpus
corpus_config=conf/corpus.yaml     # embedded corpus: speakers, voices, grammar size
train_set=train-clean-100          # several parts make one federation: "train-clean-100 train-clean-360 train-other-500"
dev_set=dev-clean
test_sets="test-clean test-other"  # embedded: test-other holds the held-out voices
min_utts=5                         # clients with fewer utterances are dropped (and logged)
min_duration=0.5
max_duration=20.0
token_type=char                    # sentencepiece model type: char, bpe or unigram
vocab_size=0                       # 0: whatever the model type needs (char)
asr_config=conf/train_asr_conformer_ctc.yaml
fl_config=conf/fl_bmuf.yaml        # BMUF: chosen on dev over FedAvg (conf/fl_fedavg.yaml), 2026-12-05
fl_args=                           # key=value overrides of fl_config, e.g. "rounds=5 strategy.beta=2"
tag=                               # experiment name; default from the configs
use_lm=true                        # stage 4 trains an ESPnet LM on lm_text; stage 6 decodes with it
lm_config=conf/train_lm_rnn.yaml
lm_text=                           # LM corpus, one sentence per line; empty: the embedded corpus's librispeech-lm-norm.txt, or with --corpus_dir the training clients' transcripts (asr.sh's default)
inference_config=                  # empty: conf/decode_asr_ctc_fusion.yaml with the LM, conf/decode_asr_ctc.yaml without
inference_model=valid.acc.best.pth
inference_lm=valid.loss.best.pth
client_jobs=2                      # processes that train a round's clients in parallel (per rank)
nproc=1                            # torchrun ranks on this machine (> 1: fl_train runs under torchrun)
dist_args=                         # more torchrun options, for several machines: "--nnodes 2 --rdzv_backend c10d ..."
backend=native                     # stage 5: native (this process and its workers or torchrun ranks) | flower-grpc (a SuperLink and SuperNodes on 127.0.0.1) | flower-sim (Flower's simulation engine)
flower_nodes=2                     # --backend flower-*: SuperNodes, each holding its share of the clients
ngpu=0                             # 1: training (one GPU per rank) and decoding on CUDA; an error without a GPU
centralized=false                  # true: also train the centralized reference for the same client CPU-seconds (stage 5), decode it (stage 6)
centralized_config=conf/centralized.yaml
data=data                          # where manifests, clients and token lists go
exp=exp                            # where statistics and experiments go

help_message=$(cat <<EOF
Usage: $0 [--option value] ...

Options:
  --stage              # first stage to run: 0 corpus ... 5 training, 6 decoding, 7 packing (default="${stage}")
  --stop_stage         # last stage to run (default="${stop_stage}")
  --nj                 # parallel jobs of the data stages and of decoding (default="${nj}")
  --seed               # corpus synthesis and training seed (default="${seed}")
  --corpus_dir         # LibriSpeech root; empty: synthesize the embedded corpus (default="${corpus_dir}")
  --corpus_config      # embedded corpus: speakers, voices, grammar size (default="${corpus_config}")
  --train_set          # training part(s), one federation; several in quotes (default="${train_set}")
  --dev_set            # validation part (default="${dev_set}")
  --test_sets          # decoded parts (default="${test_sets}")
  --min_utts           # clients with fewer utterances are dropped (default="${min_utts}")
  --min_duration       # shortest utterance kept, seconds (default="${min_duration}")
  --max_duration       # longest utterance kept, seconds (default="${max_duration}")
  --token_type         # sentencepiece model type: char, bpe or unigram (default="${token_type}")
  --vocab_size         # 0: whatever the model type needs (char) (default="${vocab_size}")
  --asr_config         # ESPnet ASR model config (default="${asr_config}")
  --fl_config          # federated config: rounds, strategy, optimizers (default="${fl_config}")
  --fl_args            # key=value overrides of fl_config, in quotes (default="${fl_args}")
  --tag                # experiment name; empty: from the configs (default="${tag}")
  --use_lm             # true: train an LM on --lm_text (stage 4) and decode with it (stage 6) (default="${use_lm}")
  --lm_config          # ESPnet LM training config (default="${lm_config}")
  --lm_text            # LM corpus, e.g. librispeech-lm-norm.txt.gz; empty: the embedded corpus's, or with --corpus_dir the training clients' transcripts (default="${lm_text}")
  --inference_config   # ESPnet decoding config; empty: decode_asr_ctc_fusion.yaml or decode_asr_ctc.yaml by --use_lm (default="${inference_config}")
  --inference_model    # file in exp/<tag>, or best, latest, valid.acc.ave[_<N>best].pth (default="${inference_model}")
  --inference_lm       # the LM checkpoint to decode with (default="${inference_lm}")
  --client_jobs        # processes that train a round's clients in parallel, per rank (default="${client_jobs}")
  --nproc              # torchrun ranks on this machine; > 1 runs fl_train under torchrun (default="${nproc}")
  --dist_args          # more torchrun options, in quotes, e.g. --nnodes / --rdzv_* across machines (default="${dist_args}")
  --backend            # stage 5: native; flower-grpc (the same server and clients over Flower's transport); flower-sim (Flower's simulation engine) (default="${backend}")
  --flower_nodes       # --backend flower-*: SuperNodes, each holding its share of the clients (default="${flower_nodes}")
  --ngpu               # 1: train (one GPU per rank) and decode on CUDA; an error without a GPU (default="${ngpu}")
  --centralized        # true: also train the centralized reference for the federated run's client CPU-seconds, and decode it (default="${centralized}")
  --centralized_config # centralized reference: lr, warmup, batch size (default="${centralized_config}")
  --data               # where manifests, clients and token lists go (default="${data}")
  --exp                # where statistics and experiments go (default="${exp}")
EOF
)

defaults_client_jobs=$client_jobs defaults_flower_nodes=$flower_nodes
. ./path.sh
. utils/parse_options.sh

log() {
  local fname=${BASH_SOURCE[1]##*/}
  echo -e "$(date '+%Y-%m-%d %H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]}) $*"
}

case $backend in
  native)
    if [ "$flower_nodes" != "$defaults_flower_nodes" ]; then
      echo "$0: --flower_nodes does nothing with --backend native" >&2; exit 1
    fi ;;
  flower-grpc|flower-sim)
    # Stage 5's own options; --ngpu also serves stages 4 and 6, --client_jobs the centralized reference's threads.
    if [ "$nproc" -gt 1 ] || [ -n "$dist_args" ]; then
      echo "$0: --nproc and --dist_args do nothing with --backend $backend (each SuperNode trains its clients)" >&2; exit 1
    fi
    if [ "$stage" -le 5 ] && [ "$stop_stage" -ge 5 ]; then
      if [ "$ngpu" -gt 0 ]; then
        echo "$0: --backend $backend trains on the CPU: run stage 5 without --ngpu" >&2; exit 1
      fi
      if [ "$client_jobs" != "$defaults_client_jobs" ] && [ "$centralized" != true ]; then
        echo "$0: --client_jobs does nothing with --backend $backend (each SuperNode trains its clients)" >&2; exit 1
      fi
    fi ;;
  *) echo "$0: --backend is native, flower-grpc or flower-sim, not '$backend'" >&2; exit 1 ;;
esac
if [ "$ngpu" -gt 0 ] && [ "$centralized" = true ]; then
  echo "$0: --ngpu applies to federated training and decoding; the centralized reference runs on the CPU only" >&2
  exit 1
fi

manifests=$data/manifests
train_dir=$data/clients/${train_set// /_}   # clients.jsonl and one cuts manifest per speaker
if [ -z "$corpus_dir" ]; then
  corpus=$data/corpus/LibriSpeech
else
  corpus=$corpus_dir
fi
if [ "$token_type" = char ]; then
  token_dir=$data/token_list/char
else
  token_dir=$data/token_list/${token_type}${vocab_size}
fi
if [ -z "$tag" ]; then
  tag=$(basename "${fl_config%.*}")_$(basename "${asr_config%.*}")
fi
expdir=$exp/$tag
lm_exp=$exp/lm_$(basename "${lm_config%.*}")
lm_from_clients=false
if [ -z "$lm_text" ] && [ -z "$corpus_dir" ]; then
  lm_text=$corpus/librispeech-lm-norm.txt
elif [ -z "$lm_text" ]; then
  # asr.sh's default lm_train_text, the training set's text: stage 4 writes the clients' transcripts here.
  lm_text=$train_dir/transcripts.txt
  lm_from_clients=true
fi
if [ -z "$inference_config" ]; then
  if [ "$use_lm" = true ]; then inference_config=conf/decode_asr_ctc_fusion.yaml; else inference_config=conf/decode_asr_ctc.yaml; fi
fi
lm_args=()                         # stages 6 and 7: the LM that decoding fuses
if [ "$use_lm" = true ]; then
  lm_args=(--lm_train_config "$lm_exp/config.yaml" --lm_file "$lm_exp/$inference_lm")
fi
central_expdir=$exp/centralized_$(basename "${asr_config%.*}")
decode_expdirs=$expdir
if [ "$centralized" = true ]; then
  decode_expdirs="$expdir $central_expdir"
fi

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
  if [ -z "$corpus_dir" ]; then
    log "Stage 0: synthesize the embedded corpus into $corpus"
    python -m fl_lib.bin.synthesize_corpus --config "$corpus_config" \
      --output_dir "$corpus" --seed "$seed" --nj "$nj"
  else
    log "Stage 0: check the LibriSpeech layout of $corpus_dir"
    python -m fl_lib.bin.check_corpus --corpus_dir "$corpus_dir"
  fi
fi

if [ $stage -le 1 ] && [ $stop_stage -ge 1 ]; then
  log "Stage 1: Lhotse manifests of $corpus -> $manifests"
  python -m fl_lib.bin.prepare_manifests --corpus_dir "$corpus" \
    --output_dir "$manifests" --nj "$nj"
fi

if [ $stage -le 2 ] && [ $stop_stage -ge 2 ]; then
  log "Stage 2: one client per speaker of $train_set -> $train_dir; filtered dev/test sets"
  train_cuts=()
  for part in $train_set; do
    train_cuts+=("$manifests/librispeech_cuts_${part}.jsonl.gz")
  done
  python -m fl_lib.bin.split_clients --cuts "${train_cuts[@]}" --output_dir "$train_dir" \
    --min_utts "$min_utts" --min_duration "$min_duration" --max_duration "$max_duration"
  for part in $dev_set $test_sets; do
    python -m fl_lib.bin.filter_cuts \
      --cuts "$manifests/librispeech_cuts_${part}.jsonl.gz" \
      --output "$data/sets/${part}.jsonl.gz" \
      --min_duration "$min_duration" --max_duration "$max_duration"
  done
fi

if [ $stage -le 3 ] && [ $stop_stage -ge 3 ]; then
  log "Stage 3: federated feature statistics (each client sums its own fbank)"
  python -m fl_lib.bin.compute_feats_stats \
    --clients "$train_dir/clients.jsonl" \
    --asr_config "$asr_config" --output_dir "$exp/asr_stats"
fi

if [ $stage -le 4 ] && [ $stop_stage -ge 4 ]; then
  log "Stage 4: sentencepiece ($token_type) and ESPnet token list -> $token_dir"
  python -m fl_lib.bin.train_tokenizer \
    --clients "$train_dir/clients.jsonl" \
    --token_type "$token_type" --vocab_size "$vocab_size" --output_dir "$token_dir"
  if [ "$use_lm" = true ]; then
    # As asr.sh's LM stages: the LM reads --lm_text, by default the training set's text. Here the
    # default is the embedded corpus's LM text; with --corpus_dir, the clients' transcripts, which
    # the server then reads, as it reads them for the tokenizer above.
    if [ "$lm_from_clients" = true ]; then
      log "Stage 4: no --lm_text: the LM learns the training clients' transcripts -> $lm_text"
      python -m fl_lib.bin.client_text --clients "$train_dir/clients.jsonl" --output "$lm_text"
    fi
    log "Stage 4: ESPnet LM on $lm_text -> $lm_exp (log: $lm_exp/train.log)"
    mkdir -p "$lm_exp"
    python -m fl_lib.bin.train_lm --lm_config "$lm_config" --text "$lm_text" \
      --token_list "$token_dir/tokens.txt" --bpemodel "$token_dir/bpe.model" \
      --seed "$seed" --ngpu "$ngpu" --output_dir "$lm_exp" > "$lm_exp/train.log" 2>&1 \
      || { tail -n 20 "$lm_exp/train.log"; exit 1; }
  fi
fi

if [ $stage -le 5 ] && [ $stop_stage -ge 5 ]; then
  log "Stage 5: federated training -> $expdir (log: $expdir/train.log)"
  mkdir -p "$expdir"
  launcher="python -m fl_lib.bin.fl_train"
  backend_args=(--client_jobs "$client_jobs" --ngpu "$ngpu")
  if [ "$backend" != native ]; then
    engine=grpc; [ "$backend" = flower-sim ] && engine=simulation
    launcher="python -m fl_lib.bin.flower_train"; backend_args=(--nodes "$flower_nodes" --engine "$engine")
  elif [ "$nproc" -gt 1 ] || [ -n "$dist_args" ]; then
    # torchrun; --standalone picks a free local port when no rendezvous is given
    launcher="python -m torch.distributed.run --nproc_per_node $nproc ${dist_args:---standalone} -m fl_lib.bin.fl_train"
  fi
  # shellcheck disable=SC2086
  $launcher \
    --asr_config "$asr_config" --fl_config "$fl_config" \
    --train_clients "$train_dir/clients.jsonl" \
    --dev_cuts "$data/sets/${dev_set}.jsonl.gz" \
    --token_list "$token_dir/tokens.txt" --bpemodel "$token_dir/bpe.model" \
    --feats_stats "$exp/asr_stats/feats_stats.npz" "${backend_args[@]}" \
    --seed "$seed" --output_dir "$expdir" $fl_args 2>&1 | tee -a "$expdir/train.log"
  if [ "$centralized" = true ]; then
    log "Stage 5: centralized reference on the pooled clients, for $expdir's client CPU-seconds -> $central_expdir (log: $central_expdir/train.log)"
    mkdir -p "$central_expdir"
    python -m fl_lib.bin.train_centralized \
      --asr_config "$asr_config" --config "$centralized_config" \
      --train_clients "$train_dir/clients.jsonl" \
      --dev_cuts "$data/sets/${dev_set}.jsonl.gz" \
      --token_list "$token_dir/tokens.txt" --bpemodel "$token_dir/bpe.model" \
      --feats_stats "$exp/asr_stats/feats_stats.npz" --num_threads "$client_jobs" \
      --seed "$seed" --budget_from "$expdir" --output_dir "$central_expdir" 2>&1 | tee -a "$central_expdir/train.log"
  fi
fi

if [ $stage -le 6 ] && [ $stop_stage -ge 6 ]; then
  # Named after the decoding config and the model, as in ESPnet: two decode configs never share a directory.
  # With the LM, asr.sh's naming: decode_<config>_lm_<lm exp>_<lm model>_<asr model>.
  inference_tag=$(basename "${inference_config%.*}")
  if [ "$use_lm" = true ]; then
    inference_tag+=_lm_$(basename "$lm_exp")_${inference_lm%.pth}
  fi
  inference_tag+=_$(basename "${inference_model%.pth}")
  for dir in $decode_expdirs; do
    log "Stage 6: decode and score $dev_set $test_sets of $dir with $inference_model -> $dir/$inference_tag"
    for part in $dev_set $test_sets; do
      python -m fl_lib.bin.decode --exp_dir "$dir" --model "$inference_model" \
        --inference_config "$inference_config" \
        --cuts "$data/sets/${part}.jsonl.gz" --nj "$nj" --ngpu "$ngpu" "${lm_args[@]}" \
        --output_dir "$dir/$inference_tag/$part"
    done
    # RESULTS.md tables every decoding of this experiment (with and without the LM, ...), as ESPnet's.
    python -m fl_lib.bin.make_results --exp_dir "$dir" --decode_dir "$dir"/decode_*/
    log "Results: $dir/RESULTS.md"
  done
fi

if [ $stage -le 7 ] && [ $stop_stage -ge 7 ]; then
  # asr.sh's last stage: ESPnet's packer (espnet2.bin.pack asr) on the model stage 6 decodes, with its
  # token list, sentencepiece model, feature statistics, LM, RESULTS.md, and decode.yaml: the decoding
  # options, which neither the packer nor Speech2Text.from_pretrained carries (README: "Decoding a WAV").
  for dir in $decode_expdirs; do
    packed_model=$dir/$(basename "$dir")_$(basename "${inference_model%.pth}").zip
    log "Stage 7: pack $dir's $inference_model with $inference_config for Speech2Text -> $packed_model"
    python -m fl_lib.bin.pack_model --exp_dir "$dir" --model "$inference_model" \
      --inference_config "$inference_config" "${lm_args[@]}" --outpath "$packed_model"
  done
fi
