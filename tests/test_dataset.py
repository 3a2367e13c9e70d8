"""The Lhotse -> ESPnet batch loader, down to one real ESPnet training epoch."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import yaml
from lhotse import CutSet, load_manifest_lazy
from lhotse.utils import fastcopy

from fl_lib.data.clients import load_clients
from fl_lib.data.dataset import IGNORE_ID, AsrBatchDataset, load_speech, make_dataloader
from fl_lib.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_tokens) -> Tokenizer:
    return Tokenizer(*tiny_tokens)


@pytest.fixture(scope="module")
def client_cuts(tiny_clients) -> CutSet:
    """The biggest client's cuts, read lazily as the federated loop reads them."""
    client = max(load_clients(tiny_clients), key=lambda c: c.num_cuts)
    return load_manifest_lazy(client.manifest)


def _ids(loader) -> list[list[str]]:
    return [utt_ids for utt_ids, _ in loader]


def test_batch_layout(client_cuts, tokenizer):
    cuts = {c.id: c for c in client_cuts}
    loader = make_dataloader(client_cuts, tokenizer, max_cuts=3)
    seen = []
    for utt_ids, batch in loader:
        assert set(batch) == {"speech", "speech_lengths", "text", "text_lengths"}
        assert batch["speech"].dtype == torch.float32 and batch["speech"].ndim == 2
        assert batch["text"].dtype == batch["speech_lengths"].dtype == torch.int64
        assert batch["text_lengths"].dtype == torch.int64
        lengths = batch["speech_lengths"].tolist()
        assert lengths == sorted(lengths, reverse=True)
        assert batch["speech"].shape == (len(utt_ids), lengths[0])
        for i, utt in enumerate(utt_ids):
            n, m = lengths[i], int(batch["text_lengths"][i])
            assert torch.equal(batch["speech"][i, :n], torch.from_numpy(load_speech(cuts[utt])))
            assert not batch["speech"][i, n:].any()
            assert tokenizer.decode(batch["text"][i, :m].tolist()) == cuts[utt].supervisions[0].text
            assert (batch["text"][i, m:] == IGNORE_ID).all()
        seen += utt_ids
    assert sorted(seen) == sorted(cuts)


def test_deterministic_shuffle(client_cuts, tokenizer, tiny_clients):
    manifest = max(load_clients(tiny_clients), key=lambda c: c.num_cuts).manifest

    def batches(**kw):
        return _ids(make_dataloader(manifest, tokenizer, max_cuts=2, shuffle=True, **kw))

    first = batches(seed=7, epoch=1)
    assert first == batches(seed=7, epoch=1)
    loader = make_dataloader(client_cuts, tokenizer, max_cuts=2, shuffle=True, seed=7, epoch=1)
    assert _ids(loader) == _ids(loader) == first  # re-iterating gives the same batches too
    assert batches(seed=7, epoch=1, num_workers=1) == first
    orders = {tuple(itertools.chain(*batches(seed=7, epoch=e))) for e in range(4)}
    assert len(orders) > 1


def test_max_duration(client_cuts, tokenizer):
    longest = max(c.duration for c in client_cuts)
    for _, batch in make_dataloader(client_cuts, tokenizer, max_duration=2 * longest):
        assert batch["speech_lengths"].sum() <= 2 * longest * 16000 + 1


def test_resamples_to_16k(client_cuts):
    cut = next(iter(client_cuts))
    speech = load_speech(cut.resample(8000))
    assert abs(len(speech) - cut.num_samples) <= 2


def test_clear_errors(client_cuts, tokenizer):
    cut = next(iter(client_cuts))
    dataset = AsrBatchDataset(tokenizer)
    with pytest.raises(ValueError, match="expected exactly one supervision"):
        dataset[CutSet.from_cuts([fastcopy(cut, supervisions=[])])]
    empty = fastcopy(cut, supervisions=[fastcopy(cut.supervisions[0], text=" ")])
    with pytest.raises(ValueError, match="empty transcript"):
        dataset[CutSet.from_cuts([empty])]
    with pytest.raises(ValueError, match="max_duration"):
        make_dataloader(client_cuts, tokenizer)


def test_espnet_train_one_epoch(client_cuts, tokenizer, tiny_tokens, tiny_stats, tiny_asr_config):
    """Three batches of the loader through ESPnet's own Trainer on the recipe's model."""
    from fl_lib.espnet_env import asr_task

    asr = asr_task()
    from espnet2.train.distributed_utils import DistributedOption
    from espnet2.train.reporter import Reporter
    from espnet2.train.trainer import Trainer

    args = asr.get_parser().parse_args([])
    for key, value in yaml.safe_load(tiny_asr_config.read_text()).items():
        setattr(args, key, value)
    args.token_list = tokenizer.tokens
    args.token_type, args.bpemodel = "bpe", str(tiny_tokens[0])
    args.normalize_conf = {"stats_file": str(tiny_stats)}
    args.ngpu = 0
    torch.manual_seed(0)
    model = asr.build_model(args)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # batches of 2 exercise the RNN encoder's packing of a padded, sorted batch
    loader = make_dataloader(client_cuts, tokenizer, max_cuts=2, shuffle=True, seed=0)
    num_batches = min(3, math.ceil(len(client_cuts.to_eager()) / 2))
    # One intra-op thread: on a shared 2-core machine, 2 OpenMP threads ran these
    # batches 10-50x slower (0.7 s vs 9-35 s measured) while other jobs were busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Reporter().observe("train") as sub:
            Trainer.train_one_epoch(
                model=model,
                iterator=itertools.islice(loader, 3),
                optimizers=[optimizer],
                schedulers=[None],
                scaler=None,
                reporter=sub,
                summary_writer=None,
                options=Trainer.build_options(args),
                distributed_option=DistributedOption(distributed=False),
            )
    finally:
        torch.set_num_threads(threads)
    losses = [v.value for v in sub.stats["loss"]]
    assert len(losses) == num_batches and all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_audio_cache_gives_identical_batches(client_cuts, tokenizer):
    """Cached epochs are bit-identical to uncached ones; the second epoch decodes nothing."""
    from fl_lib.data.dataset import AudioCache

    cache = AudioCache(max_mb=64)
    num_cuts = len(list(client_cuts))
    for epoch in (0, 1):
        plain = list(make_dataloader(client_cuts, tokenizer, max_cuts=3, shuffle=True, seed=5, epoch=epoch))
        cached = list(make_dataloader(client_cuts, tokenizer, max_cuts=3, shuffle=True, seed=5, epoch=epoch,
                                      audio_cache=cache))
        assert [ids for ids, _ in plain] == [ids for ids, _ in cached]
        for (_, a), (_, b) in zip(plain, cached):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)
    assert (cache.misses, cache.hits) == (num_cuts, num_cuts)


def test_audio_cache_evicts_least_recently_used(client_cuts):
    from fl_lib.data.dataset import AudioCache

    cuts = list(client_cuts)[:3]
    sizes = [load_speech(c).nbytes for c in cuts]
    cache = AudioCache(max_mb=(sizes[0] + sizes[2]) / 2**20)
    cache.speech(cuts[0])
    cache.speech(cuts[1])
    cache.speech(cuts[0])  # cuts[1] is now the least recently used
    cache.speech(cuts[2])
    assert list(cache.items) == [cuts[0].id, cuts[2].id]
    assert cache.bytes == sizes[0] + sizes[2] and (cache.hits, cache.misses) == (1, 3)
    with pytest.raises(ValueError, match="> 0 MB"):
        AudioCache(0)
