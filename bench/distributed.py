"""Rounds with 1 process against torchrun with 2 (gloo, CPU): the speed-up of sharing a round's clients.

Both runs are `python -m fl_lib.bin.fl_train` on the same tiny synthesized corpus
(stages 0-4 through the library, cached in --work_dir), the recipe's small RNN
model and `fl_fedavg.yaml`, the same seed, clients, rounds and local steps, no
dev set. The time compared is the sum of the rounds' `train_seconds` in
metrics.jsonl (clients, reduction, server step: start-up and checkpoints are not
in it); the wall time of each command, start-up included, comes along.

    .venv/bin/python bench/distributed.py
    .venv/bin/python bench/distributed.py --speakers 8 --rounds 3 --steps 4 --work_dir /tmp/flb_dist

Target on 2 cores: speedup >= 1.6.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def run(nproc: int, data: dict, out: Path, args) -> dict:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [
        *launcher, "-m", "fl_lib.bin.fl_train", "--asr_config", data["asr_config"],
        "--fl_config", common.CONF_DIR / "fl_fedavg.yaml", "--train_clients", data["clients"],
        "--token_list", data["token_list"], "--bpemodel", data["bpemodel"], "--feats_stats", data["feats_stats"],
        "--output_dir", out, "--seed", "1",
        f"rounds={args.rounds}", f"clients_per_round={args.speakers}", f"client.max_steps={args.steps}",
        f"client.max_duration={args.max_duration}", "validate_every=1000",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(common.REPO)}
    t0 = time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"round_seconds": sum(r["train_seconds"] for r in rows), "wall_seconds": wall, "clients": [r["clients"] for r in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speakers", type=int, default=8, help="clients, all of them trained every round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="local steps per client (client.max_steps)")
    p.add_argument("--max_duration", type=float, default=15.0, help="seconds of audio per batch")
    p.add_argument("--work_dir", type=Path, default=None, help="caches the synthesized data")
    args = p.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    data = common.tiny_data(work, speakers=args.speakers)
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, data, Path(tmp) / "one", args)
        two = run(2, data, Path(tmp) / "two", args)
    assert one["clients"] == two["clients"], "the runs trained other clients"
    common.emit({
        "bench": "distributed", "speakers": args.speakers, "rounds": args.rounds, "steps": args.steps,
        "round_seconds_1proc": round(one["round_seconds"], 2), "round_seconds_2proc": round(two["round_seconds"], 2),
        "speedup": round(one["round_seconds"] / two["round_seconds"], 3),
        "wall_seconds_1proc": round(one["wall_seconds"], 1), "wall_seconds_2proc": round(two["wall_seconds"], 1),
        "load_avg_1min": os.getloadavg()[0], "cpus": os.cpu_count(),
    })


if __name__ == "__main__":
    main()
