"""Time per round over Flower's transport against the native loop, on the same clients.

Both runs are the recipe's stage 5 on the demo's data (`make demo`, or `run.sh --stage 0
--stop_stage 4`): the demo model and federated config, the same seed, so the same clients
each round; no dev set, so a round is the clients' training, the aggregation, the server
step and the checkpoint. Native trains a round's clients in `--client_jobs 2` worker
processes; flower-grpc on 2 SuperNodes (a SuperLink and the nodes as separate processes on
127.0.0.1), each with its resident trainer (ESPnet imported once per node), and
flower-grpc-per-message the same with Flower's plain per-message ClientApp process
(`--node_trainer per_message`); flower-sim on Flower's simulation engine with 2 virtual nodes
of one CPU each: each has two cores' worth of clients in flight. Every run must end with
native's global model, bit for bit (`bitwise_equal_to_native`), or the bench fails. The
ratios are median round times over native's; the bytes are those of the ArrayRecords: the start weights sent to each client
and the pseudo-gradients received. Memory is the peak, sampled every 2 s, of the summed
proportional memory (PSS) of every process a run starts (the server, workers, SuperLink,
SuperNodes, ClientApps, Ray).

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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RECIPE = REPO / "egs/librispeech_fl"


def pss_mb(root: int) -> float:
    """Proportional memory (shared pages split between their users) of `root` and every process
    below it, summed, in MiB."""
    from fl_lib.flower.deployment import descendants

    total_kb = 0
    for pid in {root} | descendants([root]):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total_kb / 1024


def stage5(tool: str, out: Path, opts, extra: list[str]) -> tuple[list[dict], float]:
    """The run's metrics.jsonl rows and the peak memory of its processes."""
    data = Path(opts.data)
    cmd = [sys.executable, "-m", tool, "--asr_config", opts.asr_config, "--fl_config", opts.fl_config,
           "--train_clients", str(data / "clients/train-clean-100/clients.jsonl"),
           "--token_list", str(data / "token_list/char/tokens.txt"), "--bpemodel", str(data / "token_list/char/bpe.model"),
           "--feats_stats", str(Path(opts.exp) / "asr_stats/feats_stats.npz"), "--seed", str(opts.seed),
           "--output_dir", str(out), *extra, f"rounds={opts.rounds}", *opts.fl_args.split()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = open(out.parent / f"{out.name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=RECIPE, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, pss_mb(proc.pid))
        time.sleep(2.0)
    if proc.returncode != 0:
        raise SystemExit(f"{tool} failed: see {log.name}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], peak


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
    work.mkdir(parents=True, exist_ok=True)
    runs, peaks = {}, {}
    runs["native"], peaks["native"] = stage5("fl_lib.bin.fl_train", work / "native", opts, ["--client_jobs", "2"])
    flower = {"flower-grpc": ["--engine", "grpc"], "flower-grpc-per-message": ["--engine", "grpc", "--node_trainer", "per_message"],
              "flower-simulation": ["--engine", "simulation"]}
    for name, extra in flower.items():
        runs[name], peaks[name] = stage5("fl_lib.bin.flower_train", work / name, opts, ["--nodes", "2", *extra])
    samples = {name: [r["clients"] for r in rows] for name, rows in runs.items()}
    if len({json.dumps(s) for s in samples.values()}) != 1:
        raise SystemExit("the runs trained different clients: not the same experiment")
    import torch

    reference = torch.load(work / "native" / "latest.pth", map_location="cpu")
    equal = {}
    for name in flower:
        model = torch.load(work / name / "latest.pth", map_location="cpu")
        equal[name] = model.keys() == reference.keys() and all(torch.equal(model[k], reference[k]) for k in model)
    native = statistics.median(r["seconds"] for r in runs["native"])
    result = {"rounds": opts.rounds, "clients_per_round": len(runs["native"][0]["clients"]), "fl_config": opts.fl_config,
              "asr_config": opts.asr_config, "work_dir": str(work)}
    for name, rows in runs.items():
        result[name] = {"round_seconds": [round(r["seconds"], 2) for r in rows],
                        "client_seconds": [round(r["client_seconds"], 2) for r in rows],
                        "ratio_median_round": statistics.median(r["seconds"] for r in rows) / native,
                        "peak_pss_mb": round(peaks[name])}
    for name in flower:
        result[name]["bytes_per_draw"] = json.loads((work / name / "flower_status.json").read_text())["bytes_per_draw"]
        result[name]["bitwise_equal_to_native"] = equal[name]
    print(json.dumps(result, indent=1))
    if opts.out:
        opts.out.write_text(json.dumps(result, indent=1) + "\n")
    if not all(equal.values()):
        raise SystemExit(f"not native's model, bit for bit: {[n for n, e in equal.items() if not e]}")


if __name__ == "__main__":
    main()
