"""Session-wide fixtures: one tiny embedded corpus, carried through stages 0-4.

Each fixture calls the same library function the recipe's stage calls, on real
synthesized audio, so the later tests (training, decoding) run on real data.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import fl_lib  # noqa: F401  sets MKL_CBWR before any test module loads torch

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Stage 0: a LibriSpeech-layout root with train-clean-100, dev-clean, test-clean, test-other."""
    from fl_lib.corpus.synthesize import CorpusConfig, synthesize_corpus

    root = tmp_path_factory.mktemp("corpus") / "LibriSpeech"
    synthesize_corpus(root, CorpusConfig.tiny(seed=0), nj=2)
    return root


@pytest.fixture(scope="session")
def tiny_manifests(tiny_corpus, tmp_path_factory) -> dict:
    """Stage 1: {part: cuts manifest path}."""
    from fl_lib.data.manifests import prepare_manifests

    return prepare_manifests(tiny_corpus, tmp_path_factory.mktemp("manifests"), nj=2)


@pytest.fixture(scope="session")
def tiny_clients(tiny_manifests, tmp_path_factory) -> Path:
    """Stage 2: clients.jsonl of the training part, one client per speaker."""
    from fl_lib.data.clients import split_clients

    out = tmp_path_factory.mktemp("clients")
    return split_clients(tiny_manifests["train-clean-100"], out, min_utts=1)


@pytest.fixture(scope="session")
def tiny_sets(tiny_manifests, tmp_path_factory) -> dict:
    """Stage 2: {part: filtered cuts} of the dev and test parts."""
    from fl_lib.data.clients import filter_cuts

    out = tmp_path_factory.mktemp("sets")
    return {
        part: filter_cuts(tiny_manifests[part], out / f"{part}.jsonl.gz")
        for part in ("dev-clean", "test-clean", "test-other")
    }


@pytest.fixture(scope="session")
def tiny_tokens(tiny_clients, tmp_path_factory):
    """Stage 4: (bpemodel, token_list) of a char sentencepiece model."""
    from fl_lib.data.tokenizer import train_tokenizer_from_clients

    out = tmp_path_factory.mktemp("tokens")
    return train_tokenizer_from_clients(tiny_clients, out, token_type="char", vocab_size=0)


@pytest.fixture(scope="session")
def tiny_asr_config() -> Path:
    """The small ESPnet model config that the recipe ships."""
    return Path(__file__).resolve().parents[1] / "egs/librispeech_fl/conf/train_asr_rnn_small.yaml"


@pytest.fixture(scope="session")
def tiny_stats(tiny_clients, tiny_asr_config, tmp_path_factory) -> Path:
    """Stage 3: feats_stats.npz summed from per-client statistics."""
    from fl_lib.features.stats import federated_feats_stats

    out = tmp_path_factory.mktemp("stats")
    return federated_feats_stats(tiny_clients, tiny_asr_config, out)
