"""Validation of the global model on the dev set, once per round (or every N rounds)."""
from __future__ import annotations

from typing import Iterable

import torch


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, tokenizer) -> dict:
    """Dev loss and accuracy as ESPnet reports them, plus a CTC-greedy WER.

    One encoder pass per batch: the CTC head's input, captured by a forward
    pre-hook during ESPnet's own loss computation, also gives the greedy
    hypotheses. The WER needs no beam search, so it is cheap enough to track every
    round; stage 6 gives the real (beam-search) WER of the final model.
    """
    from espnet2.torch_utils.device_funcs import to_device

    from ..asr.scoring import score

    model.eval()
    device = next(model.parameters()).device
    sums: dict = {}
    total_weight = 0.0
    refs, hyps = [], []
    seen: list = []  # (encoder output, lengths) of the current batch, as the CTC head saw them
    hook = model.ctc.register_forward_pre_hook(lambda _m, a: seen.append(a[:2])) if model.ctc is not None else None
    try:
        for _utt_ids, batch in batches:
            seen.clear()
            _loss, stats, weight = model(**to_device(batch, device))
            w = float(weight)
            total_weight += w
            for key in ("loss", "acc"):
                if stats.get(key) is not None:
                    sums[key] = sums.get(key, 0.0) + float(stats[key]) * w
            if hook is None:  # an attention-only model (ctc_weight 0) has no CTC head
                continue
            (enc, enc_lens), = seen
            _greedy(model, enc, enc_lens, batch, tokenizer, refs, hyps)
    finally:
        if hook is not None:
            hook.remove()
    out = {key: v / total_weight for key, v in sums.items()}
    if refs:
        stats = score(refs, hyps)
        out["wer"] = stats.err / max(stats.wrd, 1)
    return out


def _greedy(model, enc, enc_lens, batch, tokenizer, refs: list, hyps: list) -> None:
    """Append the batch's CTC-greedy hypotheses and references, as text."""
    best = model.ctc.argmax(enc)
    for ids, n, ref, ref_len in zip(best, enc_lens, batch["text"], batch["text_lengths"]):
        collapsed = torch.unique_consecutive(ids[: int(n)]).tolist()
        hyps.append(tokenizer.decode(collapsed))
        refs.append(tokenizer.decode(ref[: int(ref_len)].tolist()))


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, batches: Iterable) -> float:
    """The model's loss on held-out batches (ESPnet's `loss`, weighted as in `evaluate`), no decoding:
    rl_dga scores two candidate models with it every round, so it must stay cheap."""
    from espnet2.torch_utils.device_funcs import to_device

    model.eval()
    device = next(model.parameters()).device
    total = weight_sum = 0.0
    for _utt_ids, batch in batches:
        _loss, stats, weight = model(**to_device(batch, device))
        total += float(stats["loss"]) * float(weight)
        weight_sum += float(weight)
    if weight_sum == 0:
        raise ValueError("the held-out set gave no batch: nothing to score the candidate updates on")
    return total / weight_sum
