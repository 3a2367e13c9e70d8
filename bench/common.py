"""Shared helpers of the benchmarks: a tiny real data pipeline, a bench-size ESPnet config, peak RSS."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "egs/librispeech_fl/conf"

# A 9.3M-parameter conformer CTC/attention model: the size class of a real FL ASR
# experiment, small enough that K copies of its state are easy to see in RSS.
CONFORMER_CONF = {
    "frontend": "default",
    "frontend_conf": {"fs": "16k", "n_fft": 512, "win_length": 400, "hop_length": 160, "n_mels": 80},
    "normalize": None,
    "encoder": "conformer",
    "encoder_conf": {
        "output_size": 256,
        "attention_heads": 4,
        "linear_units": 1024,
        "num_blocks": 4,
        "dropout_rate": 0.1,
        "input_layer": "conv2d",
        "macaron_style": True,
        "use_cnn_module": True,
        "cnn_module_kernel": 15,
        "rel_pos_type": "latest",
        "pos_enc_layer_type": "rel_pos",
        "selfattention_layer_type": "rel_selfattn",
    },
    "decoder": "transformer",
    "decoder_conf": {"attention_heads": 4, "linear_units": 1024, "num_blocks": 1, "dropout_rate": 0.1},
    "model_conf": {"ctc_weight": 0.3, "lsm_weight": 0.1, "length_normalized_loss": False},
}

CHAR_TOKENS = ["<blank>", "<unk>", "<space>", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'", "<sos/eos>"]


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_bench_model_files(out_dir: Path) -> tuple[Path, Path]:
    """(asr_config.yaml, tokens.txt) of the bench conformer, written under `out_dir`."""
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    conf, tokens = out_dir / "asr_conformer_bench.yaml", out_dir / "tokens.txt"
    conf.write_text(yaml.safe_dump(CONFORMER_CONF, sort_keys=False))
    tokens.write_text("".join(t + "\n" for t in CHAR_TOKENS))
    return conf, tokens


def tiny_data(work_dir: Path, utts_per_client: int | None = None, speakers: int | None = None,
              asr_config: Path | None = None) -> dict:
    """Stages 0-4 on the tiny synthesized corpus, through the library calls; cached in `work_dir`.

    `utts_per_client` overrides the tiny config's 6-10 training utterances per
    speaker (about 2.5 s each), `speakers` its 4 training speakers (= clients).
    `asr_config` (default: the recipe's RNN) fixes the frontend the feature statistics
    are computed with, so they match its mel bins. Returns {clients, token_list,
    bpemodel, feats_stats, asr_config}.
    """
    import dataclasses

    work_dir = Path(work_dir)
    done = work_dir / "tiny_data.json"
    asr_config = Path(asr_config) if asr_config else CONF_DIR / "train_asr_rnn_small.yaml"
    wanted = {"utts_per_client": utts_per_client, "speakers": speakers, "asr_config": str(asr_config.resolve())}
    if done.is_file():
        cached = json.loads(done.read_text())
        if cached.pop("built_with", None) == wanted:
            return {k: Path(v) for k, v in cached.items()}
        raise ValueError(f"{work_dir} holds data built with other settings; use another --work_dir")
    from fl_lib.corpus.synthesize import CorpusConfig, synthesize_corpus
    from fl_lib.data.clients import split_clients
    from fl_lib.data.manifests import prepare_manifests
    from fl_lib.data.tokenizer import train_tokenizer_from_clients
    from fl_lib.features.stats import federated_feats_stats

    root = work_dir / "corpus" / "LibriSpeech"
    corpus_conf = CorpusConfig.tiny(seed=0)
    if utts_per_client:
        corpus_conf = dataclasses.replace(corpus_conf, train_utts=(utts_per_client, utts_per_client))
    if speakers:
        corpus_conf = dataclasses.replace(corpus_conf, num_train_speakers=speakers)
    synthesize_corpus(root, corpus_conf, nj=2)
    manifests = prepare_manifests(root, work_dir / "manifests", nj=2)
    clients = split_clients(manifests["train-clean-100"], work_dir / "clients", min_utts=1)
    bpemodel, token_list = train_tokenizer_from_clients(clients, work_dir / "tokens", token_type="char", vocab_size=0)
    stats = federated_feats_stats(clients, asr_config, work_dir / "stats")
    out = dict(clients=clients, token_list=token_list, bpemodel=bpemodel, feats_stats=stats, asr_config=asr_config)
    done.write_text(json.dumps({**{k: str(v) for k, v in out.items()}, "built_with": wanted}))
    return {k: Path(v) for k, v in out.items()}


def emit(record: dict) -> None:
    """The benchmark's one JSON line on stdout."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


class Timers:
    """Accumulated wall time per label."""

    def __init__(self) -> None:
        self.seconds = defaultdict(float)
        self.steps: list[float] = []  # wall time of each training step (yield to next fetch)

    @contextlib.contextmanager
    def __call__(self, label: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[label] += time.perf_counter() - t0

    def wrap(self, label: str, fn):
        @functools.wraps(fn)
        def timed(*a, **kw):
            with self(label):
                return fn(*a, **kw)

        return timed

    def iterate(self, label: str, iterable):
        """Yield from `iterable`, timing only the fetches (data loading, batch construction)."""
        it = iter(iterable)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.seconds[label] += time.perf_counter() - t0
                return
            t1 = time.perf_counter()
            self.seconds[label] += t1 - t0
            yield item
            self.steps.append(time.perf_counter() - t1)
