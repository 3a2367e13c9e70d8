"""Time per round over Flower's transport against the native loop, on the same clients.

Both runs are the recipe's stage 5 on the demo's data (`make demo`, or `run.sh --stage 0
--stop_stage 4`): the demo model and federated config, the same seed, so the same clients
each round; no dev set, so a round is the clients' training, the aggregation, the server
step and the checkpoint. Native trains a round's clients in `--client_jobs 2` worker
processes; flower-grpc on 2 SuperNodes (a SuperLink and the nodes as separate processes on
127.0.0.1), so both have two cores' worth of clients in flight. The ratio is the median
round time of flower-grpc over native's; the bytes are those of the ArrayRecords: the
start weights sent to each client and the pseudo-gradients received.

    .venv/bin/python bench/flower_overhead.py --rounds 4 --out bench/results/flower_overhead.json

Target: flower-grpc <= 1.25x native. Run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "egs/librispeech_fl"


def stage5(tool: str, out: Path, opts, extra: list[str]) -> list[dict]:
    data = Path(opts.data)
    cmd = [sys.executable, "-m", tool, "--asr_config", opts.asr_config, "--fl_config", opts.fl_config,
           "--train_clients", str(data / "clients/train-clean-100/clients.jsonl"),
           "--token_list", str(data / "token_list/char/tokens.txt"), "--bpemodel", str(data / "token_list/char/bpe.model"),
           "--feats_stats", str(Path(opts.exp) / "asr_stats/feats_stats.npz"), "--seed", str(opts.seed),
           "--output_dir", str(out), *extra, f"rounds={opts.rounds}", *opts.fl_args.split()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=RECIPE, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(RECIPE / "data"), help="the recipe's data/ (stages 0-4 done)")
    p.add_argument("--exp", default=str(RECIPE / "exp"), help="the recipe's exp/ (asr_stats/feats_stats.npz)")
    p.add_argument("--asr_config", default="conf/train_asr_conformer_ctc.yaml")
    p.add_argument("--fl_config", default="conf/fl_fedavg.yaml")
    p.add_argument("--fl_args", default="", help="more key=value overrides, in quotes")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--work_dir", default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON of the result")
    opts = p.parse_args()
    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="flower_overhead_"))
    native = stage5("fl_lib.bin.fl_train", work / "native", opts, ["--client_jobs", "2"])
    flower = stage5("fl_lib.bin.flower_train", work / "flower", opts, ["--nodes", "2"])
    if [r["clients"] for r in native] != [r["clients"] for r in flower]:
        raise SystemExit("the two runs trained different clients: not the same experiment")
    status = json.loads((work / "flower/flower_status.json").read_text())
    result = {
        "rounds": opts.rounds, "clients_per_round": len(native[0]["clients"]), "fl_config": opts.fl_config,
        "asr_config": opts.asr_config,
        "native_round_seconds": [r["seconds"] for r in native], "flower_round_seconds": [r["seconds"] for r in flower],
        "native_client_seconds": [r["client_seconds"] for r in native], "flower_client_seconds": [r["client_seconds"] for r in flower],
        "ratio_median_round": statistics.median(r["seconds"] for r in flower) / statistics.median(r["seconds"] for r in native),
        "bytes_per_round": status["bytes_per_round"],
    }
    print(json.dumps(result, indent=1))
    if opts.out:
        opts.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
