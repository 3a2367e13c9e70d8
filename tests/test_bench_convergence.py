"""bench/convergence.py's driver: finished runs are reused, others are (re)started; each run's fl_train overrides."""
from __future__ import annotations

import json
import sys

from conftest import bench_module


def test_run_all_reuses_a_finished_run_and_runs_the_rest(tmp_path):
    conv = bench_module("convergence")
    jobs = []
    for name, last_round in (("finished", 80), ("killed", 30), ("new", None)):
        out = tmp_path / name
        if last_round is not None:
            out.mkdir()
            rows = [{"round": r} for r in range(10, last_round + 1, 10)]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        jobs.append(([sys.executable, "-c", f"open({str(out / 'ran')!r}, 'w')"], out))
    conv.run_all(jobs, parallel=2, rounds=80)
    assert not (tmp_path / "finished/ran").exists()
    assert (tmp_path / "killed/ran").exists() and (tmp_path / "new/ran").exists()


def test_a_method_s_overrides_reach_fl_train_after_the_common_ones_and_before_its_lr(tmp_path):
    conv = bench_module("convergence")
    cfg = {"asr_config": "conf/a.yaml", "dev_cuts": "dev.jsonl.gz", "common": {"rounds": 80, "clients_per_round": 2}}
    method = {"fl_config": "conf/fl.yaml", "lr_key": "server_optim.lr", "overrides": {"server_optim.betas": [0.0, 0.99]}}
    cmd = conv.fl_train_command(cfg, tmp_path, tmp_path / "clients.jsonl", method, 0.01, 777, tmp_path / "exp")
    assert cmd[-4:] == ["rounds=80", "clients_per_round=2", "server_optim.betas=[0.0, 0.99]", "server_optim.lr=0.01"]
    assert cmd[cmd.index("--seed") + 1] == "777"
    from fl_lib.fl.config import parse_override

    assert parse_override(cmd[-2]) == ("server_optim.betas", [0.0, 0.99])
