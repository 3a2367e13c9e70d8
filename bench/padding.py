"""Padding in the clients' batches: how much of what the encoder computes is padding, with the
sampler fl_lib uses (Lhotse's SimpleCutSampler, shuffled) and with Lhotse's duration buckets.

Each client's cuts are batched on their own, as a client trains them, for `--epochs` shuffles.
Prints one JSON line: padded seconds / speech seconds per sampler, and the batch counts.

    .venv/bin/python bench/padding.py --clients bench/out/convergence/corpus_s1234/data/clients/train-clean-100/clients.jsonl
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=Path, required=True, help="clients.jsonl of stage 2")
    p.add_argument("--max_duration", type=float, default=10.0, help="seconds of audio per batch (client.max_duration)")
    p.add_argument("--num_buckets", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    from lhotse import load_manifest_lazy
    from lhotse.dataset import DynamicBucketingSampler, SimpleCutSampler

    from fl_lib.data.clients import load_clients

    samplers = {
        "simple": lambda cuts, seed: SimpleCutSampler(cuts, max_duration=args.max_duration, shuffle=True, seed=seed),
        "buckets": lambda cuts, seed: DynamicBucketingSampler(
            cuts, max_duration=args.max_duration, num_buckets=args.num_buckets, shuffle=True, seed=seed,
            buffer_size=1000, shuffle_buffer_size=1000),
    }
    out = {}
    for name, make in samplers.items():
        speech = padded = batches = 0.0
        for client in load_clients(args.clients):
            cuts = load_manifest_lazy(client.manifest)
            for epoch in range(args.epochs):
                for batch in make(cuts, epoch):
                    durations = [c.duration for c in batch]
                    speech += sum(durations)
                    padded += max(durations) * len(durations)
                    batches += 1
        out[name] = {"padded_over_speech": round(padded / speech, 4), "batches": int(batches)}
    print(json.dumps({"bench": "padding", "clients": str(args.clients), "max_duration": args.max_duration, **out}))


if __name__ == "__main__":
    main()
