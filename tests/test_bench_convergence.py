"""bench/convergence.py and bench/curves.py: the study's rules on synthetic curves and records.

The flattening rule, the intervals, the validity rules (a FedAvg run that has not
flattened, or a missing seed, voids the report and makes the exit status 1), the
chunked training loop that stops when a run flattens, and resuming from committed records.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import bench_module

curves = bench_module("curves")
conv = bench_module("convergence")


def test_a_curve_that_still_falls_has_not_flattened_and_a_levelled_one_has():
    falling = {r: 1.0 - r / 200 for r in range(10, 160, 10)}  # still -5 % per validation at the end
    assert not curves.flattened(falling)
    levelled = {r: 0.2 + 0.8 * math.exp(-r / 15) for r in range(10, 160, 10)}
    assert curves.flattened(levelled)


def test_the_rule_compares_the_last_quarter_with_what_came_before():
    # best 0.30 by round 75 (75 % of 100); the last quarter brings it to 0.295: 1.7 % relative.
    curve = {25: 0.5, 50: 0.35, 75: 0.30, 100: 0.295}
    assert curves.flattened(curve, rel_tol=0.03)
    assert not curves.flattened(curve, rel_tol=0.01)
    # A noisy rise at the end does not undo a plateau: the best so far counts.
    assert curves.flattened({25: 0.5, 50: 0.35, 75: 0.30, 100: 0.33})
    # Too few points to tell.
    assert not curves.flattened({10: 0.3, 20: 0.3, 30: 0.3})


def test_student_t_interval_against_a_hand_computed_case():
    iv = curves.mean_interval([1.0, 2.0, 3.0])
    # mean 2, sample sd 1, t_{0.975, 2} = 4.302653: half width 4.302653 / sqrt(3) = 2.484138
    assert iv.mean == pytest.approx(2.0)
    assert iv.half_width == pytest.approx(2.484138, abs=1e-6)
    assert (iv.low, iv.high) == pytest.approx((2.0 - 2.484138, 2.0 + 2.484138), abs=1e-6)
    assert iv.excludes(-1.0) and not iv.excludes(0.0)
    assert math.isinf(curves.mean_interval([0.3]).half_width)


def test_speed_up_interval_is_geometric():
    iv = curves.ratio_interval([2.0, 8.0])
    assert iv.mean == pytest.approx(4.0)  # the geometric mean
    assert iv.low < 1.0 < iv.high  # two wildly different seeds: not significant
    same = curves.ratio_interval([3.0, 3.0, 3.0])
    assert (same.low, same.mean, same.high) == pytest.approx((3.0, 3.0, 3.0))


def test_a_run_stuck_near_100_percent_is_not_flattened():
    assert not curves.flattened({r: 1.0 for r in range(10, 70, 10)})
    assert not curves.flattened({10: 1.0, 20: 0.99, 30: 0.98, 40: 0.975, 50: 0.97, 60: 0.96})  # 4 % below its start
    assert curves.flattened({10: 1.0, 20: 0.5, 30: 0.42, 40: 0.41, 50: 0.405, 60: 0.40})


def test_first_reach_interpolates_between_validations_and_plateau_point():
    test = {10: 0.6, 20: 0.4, 30: 0.35, 40: 0.36}
    assert curves.first_reach(test, 0.4) == 20
    assert curves.first_reach(test, 0.5) == pytest.approx(15.0)
    assert curves.first_reach(test, 0.7) == 10  # already below at its first point
    assert curves.first_reach(test, 0.3) is None
    assert curves.at({10: 400, 20: 900}, 15.0) == pytest.approx(650.0)
    assert curves.plateau_point({10: 0.5, 20: 0.3, 30: 0.3}) == 20


# -- the study on synthetic records ------------------------------------------------
SEEDS = [11, 22, 33]


def study_config(tmp_path):
    cfg = {
        "recipe_dir": "egs/librispeech_fl", "corpus_config": "conf/corpus_fl64.yaml", "asr_config": "conf/train_asr_conformer_ctc_study.yaml",
        "centralized_config": "conf/centralized.yaml", "tune_seed": 1234, "seeds": SEEDS, "num_corrupted": 4,
        "parallel_jobs": 2, "chunk_rounds": 20, "max_rounds": 100, "report_max_rounds": 140, "central_epochs": 5,
        "flatten": {"rel_tol": 0.03, "window": 0.25, "min_points": 4}, "target_factor": 1.1,
        "baselines": ["fedavg", "bmuf"], "common": {"clients_per_round": 8, "validate_every": 10},
        "methods": {
            "fedavg": {"fl_config": "conf/fl_fedavg.yaml", "grid": [{"client.lr": 0.002}]},
            "bmuf": {"fl_config": "conf/fl_bmuf.yaml", "grid": [{"client.lr": 0.002}]},
            "fedavg_adam": {"fl_config": "conf/fl_fedadam.yaml", "grid": [{"server_optim.lr": 0.003}, {"server_optim.lr": 0.01}]},
        },
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cfg, path


def fl_record(run, plateau: float, speed: float, flattened: bool = True, corrupted=("c1",)) -> dict:
    """A record whose WER falls as plateau + 0.6 exp(-speed * round / 30); 40 steps per round, plus 5."""
    rounds = list(range(10, 101, 10))
    wer = {r: plateau + 0.6 * math.exp(-speed * r / 30) for r in rounds}
    rec = {"run": run.__dict__, "unit": "round", "last": rounds[-1], "status": "flattened" if flattened else "not flattened",
           "dev": wer, "test": {r: w + 0.01 for r, w in wer.items()}, "steps": {r: 40 * r + 5 for r in rounds}, "minutes": 1.0,
           "weights": {"clients": [["c1", "c2"]] * 10, "weights": [[0.25, 0.75]] * 10, "agent": [None] * 10}}
    if run.fed != conv.CLEAN:
        rec["corrupted"] = list(corrupted)
    return json.loads(json.dumps(rec))  # int keys become strings, as on disk


def write_records(study, cfg, fedavg_flattened=True, skip=()):
    methods = cfg["methods"]
    for m, spec in methods.items():
        for g in spec["grid"]:  # the last grid point has the lowest dev WER
            run = conv.Run(conv.CLEAN, m, json.dumps(g, sort_keys=True), cfg["tune_seed"])
            write(study, run, fl_record(run, 0.3 - 0.01 * spec["grid"].index(g), 1.0))
    chosen = {m: json.dumps(spec["grid"][-1], sort_keys=True) for m, spec in methods.items()}
    speeds = {"fedavg": 1.0, "bmuf": 1.0, "fedavg_adam": 3.0}
    for s in SEEDS:
        central = conv.Run(conv.CLEAN, "central", None, s)
        rec = fl_record(central, 0.15, 2.0)
        rec.update(unit="epoch", last=100)
        write(study, central, rec)
        for fed in (conv.CLEAN, study.bad):
            for m in methods:
                run = conv.Run(fed, m, chosen[m], s)
                if (m, s) in skip:
                    continue
                flat = fedavg_flattened or m != "fedavg" or s != SEEDS[0]
                write(study, run, fl_record(run, 0.2 + 0.001 * s / 11, speeds[m], flat))


def write(study, run, rec):
    rec["fingerprint"] = json.loads(json.dumps(study.fingerprint(run)))
    d = study.record_dir(run)
    d.mkdir(parents=True, exist_ok=True)
    (d / "record.json").write_text(json.dumps(rec))


def report(tmp_path, path, results):
    return subprocess.run([sys.executable, str(conv.ROOT / "bench/convergence.py"), "--config", str(path), "--results",
                           str(results), "--out", str(tmp_path / "out"), "--report_only"], capture_output=True, text=True)


def test_the_report_counts_only_when_fedavg_flattened_and_every_seed_finished(tmp_path):
    cfg, path = study_config(tmp_path)
    good = tmp_path / "good"
    study = conv.Study(conv.load_study(path), tmp_path / "out", good)
    write_records(study, cfg)
    proc = report(tmp_path, path, good)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((good / "summary.json").read_text())
    assert summary["counts"] and not summary["problems"]
    adam = summary["summaries"][0]["methods"]["fedavg_adam"]
    # FedAvg (speed 1) reaches its plateau test WER at round 100; fedavg_adam (speed 3, almost the same
    # plateau) reaches that WER between its validations at rounds 30 and 40, interpolated
    curve = {r: 0.2 + 0.001 * 11 / 11 + 0.6 * math.exp(-3 * r / 30) + 0.01 for r in range(10, 101, 10)}
    base = 0.2 + 0.001 + 0.6 * math.exp(-100 / 30) + 0.01
    expected = 100 / bench_module("curves").first_reach(curve, base)
    assert adam["vs_fedavg"]["speedups"]["11"] == pytest.approx(expected, rel=1e-9)
    assert 2.5 < expected < 3.4
    assert summary["settings"]["fedavg_adam"] == {"server_optim.lr": 0.01}  # the lower tuning-seed dev WER
    # FedAvg's plateau dev WER (round 100, 4,005 steps) over the centralized best within 4,005 steps (its round 100)
    fedavg = summary["summaries"][0]["methods"]["fedavg"]
    expected = (0.201 + 0.6 * math.exp(-100 / 30)) / (0.15 + 0.6 * math.exp(-2 * 100 / 30))
    assert fedavg["dev_over_central_same_steps"]["11"] == pytest.approx(expected, rel=1e-9)
    bad = summary["summaries"][1]["methods"]["fedavg"]
    assert bad["corrupted_rel_weight"] == pytest.approx(0.5)  # c1 had 0.25 of 2 clients: half a uniform weight
    assert "does not count" not in (good / "report.md").read_text()
    assert (good / "convergence.png").stat().st_size > 0

    for name, kwargs, why in (("unflat", {"fedavg_flattened": False}, "has not flattened"),
                              ("missing", {"skip": {("bmuf", 33)}}, "have not finished")):
        results = tmp_path / name
        study = conv.Study(conv.load_study(path), tmp_path / "out", results)
        write_records(study, cfg, **kwargs)
        proc = report(tmp_path, path, results)
        assert proc.returncode == 1
        text = (results / "report.md").read_text()
        assert "This study does not count" in text and why in text


def test_a_record_made_with_other_settings_is_refused_and_an_unfinished_grid_voids_the_study(tmp_path):
    cfg, path = study_config(tmp_path)
    results = tmp_path / "results"
    study = conv.Study(conv.load_study(path), tmp_path / "out", results)
    write_records(study, cfg)
    grid_point = conv.Run(conv.CLEAN, "fedavg_adam", json.dumps({"server_optim.lr": 0.003}), 1234)
    (study.record_dir(grid_point) / "record.json").unlink()
    proc = report(tmp_path, path, results)
    assert proc.returncode == 1 and "tuning grid: clean/fedavg_adam_lr0.003_seed1234 has not finished" in proc.stdout
    changed = {**cfg, "common": {**cfg["common"], "client.max_steps": 4}}
    path.write_text(yaml.safe_dump(changed))
    other = conv.Study(conv.load_study(path), tmp_path / "out", results)
    with pytest.raises(ValueError, match="was made with other settings .*overrides"):
        other.record(conv.Run(conv.CLEAN, "fedavg", json.dumps({"client.lr": 0.002}), 11))


def test_a_run_is_extended_chunk_by_chunk_until_it_flattens_and_its_record_is_reused(tmp_path, monkeypatch):
    cfg, path = study_config(tmp_path)
    study = conv.Study(conv.load_study(path), tmp_path / "out", tmp_path / "results")
    monkeypatch.setattr(study, "corrupted", lambda seed: {"c1"})
    run = conv.Run(conv.CLEAN, "fedavg", json.dumps({"client.lr": 0.002}), 11)
    calls = []

    def fake_train(cmd, out):  # fl_train resumed up to rounds=<N>: append those rounds' metrics
        target = int(cmd[-1].split("=")[1])
        calls.append(target)
        done = conv.metrics(out)[-1]["round"] if (out / "metrics.jsonl").exists() else 0
        with open(out / "metrics.jsonl", "a") as f:
            for r in range(done + 1, target + 1):
                wer = 0.2 + 0.6 * math.exp(-r / 10) if r % 10 == 0 else None
                f.write(json.dumps({"round": r, "dev_wer": wer, "client_steps": 40, "seconds": 1.0, "train_seconds": 0.9, "lr": 1.0, "client_lr": 0.002, "clients": ["c1"], "weights": [1.0]}) + "\n")

    monkeypatch.setattr(conv.Study, "_call", staticmethod(fake_train))
    monkeypatch.setattr(conv, "decode_test", lambda exp, data, recipe: {r: 0.3 for r in range(10, 101, 10)})
    rec = study.execute(run)
    # 0.2 + 0.6 exp(-r/10): at round 60 the last quarter still gains 4.5 % (0.2110 at round 40 -> 0.2015);
    # at round 80, 0.6 % (0.2015 at round 60 -> 0.2002): flattened
    assert calls == [20, 40, 60, 80]
    assert rec["status"] == "flattened" and rec["last"] == 80
    assert rec["steps"][80] == 3200  # client steps summed over the rounds: the compute axis
    assert json.loads((study.record_dir(run) / "record.json").read_text())["last"] == 80
    assert rec["lr_end"] == {"client": 0.002, "server": 1.0}
    # A second call, as after an interruption or on another machine: the record is reused, nothing trains.
    calls.clear()
    assert study.execute(run)["last"] == 80 and calls == []


@pytest.mark.parametrize("seed, cap", [(1234, 100), (11, 140)])
def test_a_run_that_never_flattens_stops_at_its_cap_and_says_so(tmp_path, monkeypatch, seed, cap):
    """A tuning run stops at max_rounds, a reported one at report_max_rounds."""
    cfg, path = study_config(tmp_path)
    study = conv.Study(conv.load_study(path), tmp_path / "out", tmp_path / "results")
    run = conv.Run(conv.CLEAN, "bmuf", json.dumps({"client.lr": 0.002}), seed)

    def fake_train(cmd, out):
        target = int(cmd[-1].split("=")[1])
        done = conv.metrics(out)[-1]["round"] if (out / "metrics.jsonl").exists() else 0
        with open(out / "metrics.jsonl", "a") as f:
            for r in range(done + 1, target + 1):
                f.write(json.dumps({"round": r, "dev_wer": 1.0 - r / 200 if r % 10 == 0 else None, "client_steps": 40,
                                    "seconds": 1.0, "train_seconds": 0.9, "lr": 1.0, "client_lr": 0.002, "clients": [], "weights": []}) + "\n")

    monkeypatch.setattr(conv.Study, "_call", staticmethod(fake_train))
    monkeypatch.setattr(conv, "decode_test", lambda exp, data, recipe: {r: 0.5 for r in range(10, cap + 1, 10)})
    rec = study.execute(run)
    assert rec["last"] == cap and rec["status"] == "not flattened" and rec["fingerprint"]["max_rounds"] == cap


def test_the_study_config_refuses_a_reported_tuning_seed_and_unknown_keys(tmp_path):
    cfg, path = study_config(tmp_path)
    path.write_text(yaml.safe_dump({**cfg, "seeds": [1234, 22, 33]}))
    with pytest.raises(ValueError, match="tune_seed"):
        conv.load_study(path)
    path.write_text(yaml.safe_dump({**cfg, "rounds": 80}))
    with pytest.raises(ValueError, match="unknown keys"):
        conv.load_study(path)


def test_a_grid_point_s_overrides_reach_fl_train_after_the_common_ones(tmp_path):
    cfg, _ = study_config(tmp_path)
    method = {"fl_config": "conf/fl.yaml", "overrides": {"server_optim.betas": [0.0, 0.99]}}
    out = conv.fl_overrides(cfg, method, {"server_optim.lr": 0.01})
    # 140 // 10 + 140 // 20: every validated round and every chunk end up to the larger cap (report_max_rounds)
    assert out == ["clients_per_round=8", "validate_every=10", "keep_checkpoints=21",
                   "server_optim.betas=[0.0, 0.99]", "server_optim.lr=0.01"]
    from fl_lib.fl.config import parse_override

    assert parse_override(out[3]) == ("server_optim.betas", [0.0, 0.99])
    assert conv.setting_label({"server_optim.lr": 0.01, "server_optim.betas": [0.0, 0.99]}) == "lr0.01_betas0.0-0.99"
    both = {"server_optim.lr": 0.01, "client.lr": 0.004, "client.schedule.gamma": 0.99}
    assert conv.setting_label(both) == "server_optim.lr0.01_client.lr0.004_gamma0.99"


def test_a_run_killed_mid_chunk_resumes_to_the_next_chunk_boundary(tmp_path, monkeypatch):
    """Killed at round 29 (chunks of 20): the next fl_train call asks for rounds=40, not 49, so the
    validated rounds stay on the grid that keep_checkpoints was sized for."""
    cfg, path = study_config(tmp_path)
    study = conv.Study(conv.load_study(path), tmp_path / "out", tmp_path / "results")
    run = conv.Run(conv.CLEAN, "fedavg", json.dumps({"client.lr": 0.002}), 11)
    out = tmp_path / "out" / run.name
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text("".join(
        json.dumps({"round": r, "dev_wer": 0.9 if r % 10 == 0 else None, "client_steps": 40, "seconds": 1.0, "train_seconds": 0.9, "lr": 1.0, "client_lr": 0.002}) + "\n"
        for r in range(1, 30)))
    calls = []

    def fake_train(cmd, out):
        calls.append(cmd[-1])
        raise RuntimeError("stop here")

    monkeypatch.setattr(conv.Study, "_call", staticmethod(fake_train))
    with pytest.raises(RuntimeError, match="stop here"):
        study.execute(run)
    assert calls == ["rounds=40"]


def test_a_parked_run_goes_on_from_its_round_in_a_fresh_run_directory_and_keeps_its_test_curve(tmp_path, monkeypatch):
    """Stopped at round 29, parked, its run directory lost (a new session): the next execute
    restores the parked checkpoint and rows, trains from round 29 (fl_train truncates nothing
    more), decodes only the rounds validated since, and the record's test curve has every round."""
    import torch

    from fl_lib.fl.checkpoint import CHECKPOINT_KEYS

    cfg, path = study_config(tmp_path)
    study = conv.Study(conv.load_study(path), tmp_path / "out", tmp_path / "results")
    run = conv.Run(conv.CLEAN, "fedavg", json.dumps({"client.lr": 0.002}), 11)
    out = tmp_path / "out" / run.name
    out.mkdir(parents=True)

    def row(r):
        return json.dumps({"round": r, "dev_wer": 0.2 + 0.6 * math.exp(-r / 10) if r % 10 == 0 else None, "client_steps": 40,
                           "seconds": 1.0, "train_seconds": 0.9, "lr": 1.0, "client_lr": 0.002, "clients": [], "weights": []}) + "\n"

    # killed after logging round 29 but before checkpointing it: checkpoint.pth holds round 28
    (out / "metrics.jsonl").write_text("".join(row(r) for r in range(1, 30)))
    torch.save({**{k: None for k in CHECKPOINT_KEYS}, "round": 28}, out / "checkpoint.pth")
    decoded = []

    def fake_decode(exp, data, rounds):
        decoded.append(list(rounds))
        return {r: r / 1000 for r in rounds}

    monkeypatch.setattr(conv, "decode_test", fake_decode)
    assert study.park(run)
    parked = study.parked_dir(run)
    assert [json.loads(x)["round"] for x in (parked / "metrics.jsonl").read_text().splitlines()] == list(range(1, 29))
    assert json.loads((parked / "test_wer.json").read_text()) == {"10": 0.01, "20": 0.02}
    assert json.loads((parked / "parked.json").read_text())["round"] == 28
    assert torch.load(parked / "checkpoint.pth")["round"] == 28
    assert not study.park(conv.Run(conv.CLEAN, "central", None, 11))  # it does not resume: nothing to park

    shutil.rmtree(tmp_path / "out")  # a new session: the run directory is gone
    calls = []

    def fake_train(cmd, out):  # fl_train resuming from checkpoint.pth up to rounds=<N>
        calls.append(int(cmd[-1].split("=")[1]))
        done = torch.load(out / "checkpoint.pth")["round"]
        rows = conv.metrics(out)
        assert rows[-1]["round"] == done  # the parked rows end at the checkpoint's round
        with open(out / "metrics.jsonl", "a") as f:
            f.write("".join(row(r) for r in range(done + 1, calls[-1] + 1)))
        torch.save({**{k: None for k in CHECKPOINT_KEYS}, "round": calls[-1]}, out / "checkpoint.pth")

    monkeypatch.setattr(conv.Study, "_call", staticmethod(fake_train))
    decoded.clear()
    rec = study.execute(run)
    assert calls == [40, 60, 80] and rec["last"] == 80
    assert decoded == [[30, 40, 50, 60, 70, 80]]  # rounds 10 and 20 came with the parked run
    assert conv.by_key(rec["test"]) == {r: r / 1000 for r in range(10, 81, 10)}
    assert rec["steps"][80] == 3200  # the parked rows count: 40 steps in each of 80 rounds
    assert not parked.exists()  # the record supersedes it


def test_a_run_parked_from_another_directory_starts_over_and_one_with_other_settings_is_refused(tmp_path, monkeypatch):
    cfg, path = study_config(tmp_path)
    study = conv.Study(conv.load_study(path), tmp_path / "out", tmp_path / "results")
    run = conv.Run(conv.CLEAN, "fedavg", json.dumps({"client.lr": 0.002}), 11)
    parked = study.parked_dir(run)
    parked.mkdir(parents=True)
    for name in ("checkpoint.pth", "metrics.jsonl", "test_wer.json"):
        (parked / name).write_text("x")
    fingerprint = json.loads(json.dumps(study.fingerprint(run)))
    (parked / "parked.json").write_text(json.dumps({"round": 28, "out": "/elsewhere/" + run.name, "fingerprint": fingerprint}))
    out = tmp_path / "out" / run.name
    out.mkdir(parents=True)
    study.unpark(run)
    assert not any(out.iterdir())  # the checkpoint names /elsewhere: fl_train would refuse it
    (parked / "parked.json").write_text(json.dumps({"round": 28, "out": str(out), "fingerprint": {**fingerprint, "num_corrupted": 1}}))
    with pytest.raises(ValueError, match=r"parked with other settings \(num_corrupted differ\)"):
        study.unpark(run)
    # Parked under a cap of 100; the cap is 140 now: a raised cap, it goes on.
    (parked / "parked.json").write_text(json.dumps({"round": 28, "out": str(out), "fingerprint": {**fingerprint, "max_rounds": 100}}))
    study.unpark(run)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pth", "metrics.jsonl", "test_wer.json"]


def test_a_raised_cap_keeps_the_runs_that_flattened_and_trains_on_the_ones_it_stopped(tmp_path):
    """report_max_rounds 100 -> 140 (study_config's): a run that flattened at 80 is the same run
    under either cap; one stopped unflattened at 100 must train on to 140; a record whose own
    rounds are past the new cap was made by another study."""
    cfg, path = study_config(tmp_path)
    study = conv.Study(conv.load_study(path), tmp_path / "out", tmp_path / "results")
    run = conv.Run(conv.CLEAN, "fedavg", json.dumps({"client.lr": 0.002}), 11)
    assert study.cap(run) == 140

    def made(flattened: bool, last: int, cap: int) -> None:
        rec = fl_record(run, 0.2, 1.0, flattened)
        rec["last"] = last
        write(study, run, rec)
        path = study.record_dir(run) / "record.json"
        rec = json.loads(path.read_text())
        rec["fingerprint"]["max_rounds"] = cap
        path.write_text(json.dumps(rec))

    made(True, 80, 100)
    assert study.record(run)["last"] == 80
    made(True, 100, 100)  # flattened on the old cap's last chunk: the flattening rule stopped it, not the cap
    assert study.record(run)["last"] == 100
    made(False, 100, 100)
    assert study.record(run) is None  # to train on
    made(True, 160, 200)
    with pytest.raises(ValueError, match=r"other settings \(max_rounds differ\)"):
        study.record(run)
    made(False, 200, 200)
    with pytest.raises(ValueError, match=r"other settings \(max_rounds differ\)"):
        study.record(run)
