"""Cost of a round under one strategy against another, on the recipe's own data (stages 0-4 must have run).

Each strategy runs `--rounds` real rounds of `FederatedServer` with in-process clients
(one torch thread) from the same seed, so both train the same clients for the same
steps. Each round is timed by wall clock and by this process's CPU time. On a shared
machine the CPU time is the steadier figure: a neighbour's load inflates wall time
much more than CPU time. The strategies alternate round by round, so a load change
hits both. Prints one JSON line: seconds per round and the ratios.

    .venv/bin/python bench/round_cost.py                       # rl_dga against dga (server Adam), 3 rounds
    .venv/bin/python bench/round_cost.py --data /path/to/egs/librispeech_fl/data validate_every=100
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RECIPE = common.REPO / "egs/librispeech_fl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--asr_config", type=Path, default=RECIPE / "conf/train_asr_conformer_ctc.yaml")
    p.add_argument("--fl_config", type=Path, default=RECIPE / "conf/fl_rl_dga.yaml")
    p.add_argument("--baseline", type=Path, default=RECIPE / "conf/fl_dga.yaml")
    p.add_argument("--data", type=Path, default=RECIPE / "data", help="the recipe's data/ (stages 0-4)")
    p.add_argument("--feats_stats", type=Path, default=RECIPE / "exp/asr_stats/feats_stats.npz")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("overrides", nargs="*", help="key=value overrides of both federated configs")
    opts = p.parse_args()
    import torch

    from fl_lib.fl.config import FLConfig
    from fl_lib.fl.train import build_server

    torch.set_num_threads(1)
    runs = {"strategy": opts.fl_config, "baseline": opts.baseline}
    timing = {name: {"wall": [], "cpu": []} for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        for name, path in runs.items():
            conf = FLConfig.from_yaml(path, [f"rounds={opts.rounds}", "keep_checkpoints=1", *opts.overrides])
            servers[name] = build_server(
                conf, asr_config=opts.asr_config, train_clients=opts.data / "clients/train-clean-100/clients.jsonl",
                token_list=opts.data / "token_list/char/tokens.txt", bpemodel=opts.data / "token_list/char/bpe.model",
                feats_stats=opts.feats_stats, dev_cuts=opts.data / "sets/dev-clean.jsonl.gz",
                output_dir=Path(tmp) / name, seed=opts.seed, client_jobs=1,
            )
        for r in range(opts.rounds):
            for name, server in servers.items():
                wall, cpu = time.perf_counter(), time.process_time()
                m = server.run_round(r)
                server.round = server.draws = r + 1
                timing[name]["wall"].append(time.perf_counter() - wall)
                timing[name]["cpu"].append(time.process_time() - cpu)
                assert m.clients == servers["baseline"].sampler.sample(r), "the two runs must train the same clients"
    mean = {name: {k: sum(v) / len(v) for k, v in t.items()} for name, t in timing.items()}
    common.emit({
        "bench": "round_cost", "strategy": opts.fl_config.name, "baseline": opts.baseline.name, "rounds": opts.rounds,
        "seconds_per_round": {name: {k: round(v, 2) for k, v in m.items()} for name, m in mean.items()},
        "ratio_wall": round(mean["strategy"]["wall"] / mean["baseline"]["wall"], 3),
        "ratio_cpu": round(mean["strategy"]["cpu"] / mean["baseline"]["cpu"], 3),
        "per_round": timing,
    })


if __name__ == "__main__":
    main()
