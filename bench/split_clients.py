"""Benchmark stage 2's speaker split: time and peak memory on a large synthetic cuts manifest.

Writes LibriSpeech-like MonoCut lines (no audio) for S speakers x N cuts in a
shuffled order, then runs ``split_clients`` in a fresh subprocess so that its
peak RSS does not include the generator. Prints one JSON line.

    .venv/bin/python bench/split_clients.py                      # 100,000 x 10
    .venv/bin/python bench/split_clients.py --speakers 1000 --cuts_per_speaker 5
"""
from __future__ import annotations

import argparse
import gzip
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def cut_line(speaker: int, index: int, duration: float) -> str:
    """One cut as lhotse's LibriSpeech recipe + CutSet.from_manifests would write it."""
    rec_id = f"{speaker}-{speaker % 997}-{index:04d}"
    num_samples = int(duration * 16000)
    recording = {
        "id": rec_id,
        "sources": [{"type": "file", "channels": [0], "source": f"/data/LibriSpeech/train/{speaker}/{rec_id}.flac"}],
        "sampling_rate": 16000,
        "num_samples": num_samples,
        "duration": num_samples / 16000,
        "channel_ids": [0],
    }
    supervision = {
        "id": rec_id, "recording_id": rec_id, "start": 0.0, "duration": num_samples / 16000, "channel": 0,
        "text": "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG AND KEEPS RUNNING", "language": "English",
        "speaker": str(speaker),
    }
    cut = {
        "id": f"{rec_id}-0", "start": 0, "duration": num_samples / 16000, "channel": 0,
        "supervisions": [supervision], "recording": recording, "type": "MonoCut",
    }
    return json.dumps(cut)


def generate(path: Path, speakers: int, cuts_per_speaker: int, seed: int = 0) -> int:
    """Write the shuffled manifest; return the number of cuts."""
    rng = np.random.default_rng(seed)
    total = speakers * cuts_per_speaker
    order = rng.permutation(total)
    durations = rng.uniform(1.0, 20.0, size=total).round(2)
    with gzip.open(path, "wt", compresslevel=1) as f:
        batch = []
        for k in order:
            batch.append(cut_line(int(k // cuts_per_speaker), int(k % cuts_per_speaker), float(durations[k])))
            if len(batch) == 10000:
                f.write("\n".join(batch) + "\n")
                batch = []
        if batch:
            f.write("\n".join(batch) + "\n")
    return total


def run_split(cuts: Path, out: Path) -> None:
    """Child process: split and print seconds and this process's peak RSS."""
    from fl_lib.data.clients import split_clients

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    clients = split_clients(cuts, out)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    num_clients = sum(1 for _ in open(clients))
    print(json.dumps({
        "split_s": round(seconds, 2),
        "split_cpu_s": round(cpu, 2),  # the rest of split_s is waiting on the disk
        "peak_rss_mib": round(after.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
        "clients": num_clients,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speakers", type=int, default=100_000)
    parser.add_argument("--cuts_per_speaker", type=int, default=10)
    parser.add_argument("--work_dir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--split_only", nargs=2, type=Path, metavar=("CUTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.split_only:
        run_split(*args.split_only)
        return
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        cuts = Path(tmp) / "cuts.jsonl.gz"
        start = time.perf_counter()
        total = generate(cuts, args.speakers, args.cuts_per_speaker)
        generate_s = time.perf_counter() - start
        child = subprocess.run(
            [sys.executable, __file__, "--split_only", str(cuts), str(Path(tmp) / "clients")],
            check=True, capture_output=True, text=True,
        )
        result = {
            "speakers": args.speakers,
            "cuts": total,
            "input_mib": round(cuts.stat().st_size / 2**20, 1),
            "generate_s": round(generate_s, 2),
            **json.loads(child.stdout.strip().splitlines()[-1]),
        }
        print(json.dumps(result), flush=True)  # before removing the 100,000 client files


if __name__ == "__main__":
    main()
