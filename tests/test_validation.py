"""Per-round validation: one encoder pass per dev batch, and the same numbers as two separate passes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fl_lib.asr.model import build_asr_args, build_asr_model
from fl_lib.asr.scoring import score
from fl_lib.data.dataset import make_dataloader
from fl_lib.data.tokenizer import Tokenizer
from fl_lib.fl.validation import evaluate


CONFORMER = Path(__file__).resolve().parents[1] / "egs/librispeech_fl/conf/train_asr_conformer_ctc.yaml"


@pytest.fixture(scope="module")
def model_and_data(tiny_tokens, tiny_clients, tiny_sets, tmp_path_factory):
    """The recipe's conformer: ESPnet's BiGRU encoder (RNNP) applies dropout even in eval mode
    (`F.dropout` without `training=`), so two forwards of it never agree."""
    from fl_lib.features.stats import federated_feats_stats

    bpemodel, token_list = tiny_tokens
    stats = federated_feats_stats(tiny_clients, CONFORMER, tmp_path_factory.mktemp("stats40"))
    torch.manual_seed(0)
    model = build_asr_model(build_asr_args(CONFORMER, token_list, bpemodel, stats))
    with torch.no_grad():  # an untrained CTC head outputs only blanks; a sharp random one outputs varied text
        model.ctc.ctc_lo.weight.mul_(50.0)
    tokenizer = Tokenizer(bpemodel, token_list)
    return model, tokenizer, list(make_dataloader(tiny_sets["dev-clean"], tokenizer, max_cuts=2))


def test_one_encoder_pass_per_batch_and_same_result_as_two_passes(model_and_data):
    model, tokenizer, batches = model_and_data
    calls = []
    hook = model.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = evaluate(model, batches, tokenizer)
    finally:
        hook.remove()
    assert len(calls) == len(batches) > 1

    # Reference: ESPnet's forward for the loss, then a second, separate encoder pass for the greedy WER.
    refs, hyps, loss, weight = [], [], 0.0, 0.0
    with torch.no_grad():
        for _, batch in batches:
            batch = {k: v.clone() for k, v in batch.items()}
            _, stats, w = model(**batch)
            loss, weight = loss + float(stats["loss"]) * float(w), weight + float(w)
            enc, lens = model.encode(batch["speech"], batch["speech_lengths"])
            for ids, n, ref, m in zip(model.ctc.argmax(enc), lens, batch["text"], batch["text_lengths"]):
                hyps.append(tokenizer.decode(torch.unique_consecutive(ids[: int(n)]).tolist()))
                refs.append(tokenizer.decode(ref[: int(m)].tolist()))
    stats = score(refs, hyps)
    assert any(hyps) and stats.err > 0
    assert out["wer"] == stats.err / stats.wrd
    assert out["loss"] == pytest.approx(loss / weight, rel=1e-6)
