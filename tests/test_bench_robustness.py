"""bench/robustness.py on fake training: its cells, overrides, poisoned federations, records and table."""
from __future__ import annotations

import json
import re

import pytest

from conftest import bench_module

rob = bench_module("robustness")
conv = rob.convergence  # the module robustness.py imported (bench_module would load a second copy)


@pytest.fixture
def bench(tmp_path, tiny_clients, monkeypatch):
    cfg = rob.load(conv.ROOT / "bench/robustness.yaml")
    cfg.update(seeds=[11], decide_seeds=[22], rules={k: cfg["rules"][k] for k in ("fedavg", "median")},
               attacks={k: cfg["attacks"][k] for k in ("none", "sign_flip", "shuffled")}, attackers=[1, 2])
    study = conv.Study(conv.load_study(conv.ROOT / cfg["convergence_config"]), tmp_path / "corpora", tmp_path / "results")
    monkeypatch.setattr(study, "listing", lambda fed, seed: tiny_clients)  # 4 clients
    b = rob.Bench(cfg, study, tmp_path / "out", tmp_path / "results")
    b.k = 2
    calls = []

    def fake_train(exp, fl_config, listing, seed, overrides, asr_config):
        calls.append((exp.name, listing, overrides))
        exp.mkdir(parents=True, exist_ok=True)
        ids = [json.loads(x)["id"] for x in open(listing)]
        attacked = [ids[0]] if "attack.per_round" in overrides else []
        rows = [{"round": r, "clients": ids[:2], "weights": [0.25, 0.75], "attacked": attacked, "dev_wer": 0.5,
                 "client_cpu_seconds": 1.5, "server_cpu_seconds": 0.5 if "strategy.name" in overrides else 0.1}
                for r in range(1, overrides["rounds"] + 1)]
        (exp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (exp / "latest.pth").write_text("weights")

    monkeypatch.setattr(b, "train", fake_train)
    monkeypatch.setattr(rob.convergence, "decode_test", lambda exp, data, rounds: {rounds[0]: 0.4 if "median" in str(exp) else 0.3})
    b.calls = calls
    return b


def test_cells_overrides_and_poisoned_federations(bench):
    cells = rob.cells(bench.cfg)
    # per rule: none, sign_flip with f = 1 and 2, shuffled with f = 1 and 2
    assert [c.name for c in cells if c.rule == "fedavg"] == [
        "fedavg/none_seed11", "fedavg/sign_flip_f1_seed11", "fedavg/sign_flip_f2_seed11",
        "fedavg/shuffled_f1_seed11", "fedavg/shuffled_f2_seed11"]
    # column by column: a study cut short leaves whole columns
    assert [c.name for c in cells[:4]] == ["fedavg/none_seed11", "median/none_seed11",
                                           "fedavg/sign_flip_f1_seed11", "median/sign_flip_f1_seed11"]
    o = bench.overrides(rob.Cell("median", "sign_flip", 2, 11))
    assert o["attack.name"] == "sign_flip" and o["attack.per_round"] == 2 and o["strategy.name"] == "median"
    assert o["rounds"] == bench.cfg["rounds"] and "attack.per_round" not in bench.overrides(rob.Cell("median", "shuffled", 2, 11))
    listing, poisoned = bench.listing(rob.Cell("fedavg", "shuffled", 1, 11))
    assert len(poisoned) == 2  # f · N / K = 1 · 4 / 2: one poisoned client per round on average


def test_a_cell_records_its_wer_cost_and_attackers_weight_and_is_reused(bench):
    rec = bench.run(rob.Cell("fedavg", "sign_flip", 1, 11))
    # the attacker (first client) had weight 0.25 of K = 2: half a uniform weight
    assert rec["test_wer"] == 0.3 and rec["attacker_weight"] == pytest.approx(0.5)
    assert rec["client_cpu_seconds_per_round"] == 1.5 and rec["server_cpu_seconds_per_round"] == 0.1
    assert [c[0] for c in bench.calls] == ["base_seed11", "sign_flip_f1_seed11"]  # the base first, once
    bench.calls.clear()
    assert bench.run(rob.Cell("fedavg", "sign_flip", 1, 11))["test_wer"] == 0.3 and bench.calls == []
    records = {c: bench.run(c) for c in [rob.Cell("fedavg", "none", 0, 11), rob.Cell("median", "none", 0, 11),
                                         rob.Cell("fedavg", "sign_flip", 1, 11)]}
    table = rob.report(bench.cfg, records, bench.k)
    header = next(line for line in table.splitlines() if line.startswith("|rule|"))
    separator = table.splitlines()[table.splitlines().index(header) + 1]
    assert header.count("|") == separator.count("|") == 1 + 1 + 5 + 3  # rule, 5 columns, 3 costs
    # server CPU-s 0.5 against fedavg's 0.1, beside 1.5 client CPU-s: (1.5 + 0.5) / (1.5 + 0.1) = 1.25
    assert "|median|40.0|—|—|—|—|+10.0|0.500|1.25|" in table
    assert "|fedavg|30.0|30.0 w×0.50|—|—|—|+0.0|0.100|1.00|" in table
    bench.cfg["rounds"] += 1  # other settings: the record is refused
    with pytest.raises(ValueError, match="was made with other settings"):
        bench.run(rob.Cell("fedavg", "sign_flip", 1, 11))


def test_the_cells_that_decide_a_column_run_again_on_the_decide_seeds(bench):
    """A column's best rule and those within decide_margin points of it get the second seed; a column
    where a rule has not run yet decides nothing."""
    cfg = bench.cfg
    cfg.update(decide_seeds=[22], decide_margin=5.0)
    rec = lambda wer: {"test_wer": wer}  # noqa: E731
    records = {rob.Cell("fedavg", "none", 0, 11): rec(0.30), rob.Cell("median", "none", 0, 11): rec(0.34),
               rob.Cell("fedavg", "sign_flip", 1, 11): rec(0.90), rob.Cell("median", "sign_flip", 1, 11): rec(0.40),
               rob.Cell("fedavg", "sign_flip", 2, 11): rec(0.95)}  # median not run at f = 2
    assert rob.deciding_cells(cfg, records) == [rob.Cell("fedavg", "none", 0, 22), rob.Cell("median", "none", 0, 22),
                                                rob.Cell("median", "sign_flip", 1, 22)]


def test_the_table_reads_the_first_seeds_and_the_decide_seeds_are_paired_by_seed(bench):
    """Seed 22 is another corpus: a cell run on it too must not average with cells run on seed 11 only.
    The table keeps seed 11; the decide table gives each seed's WER and its difference to the column's best."""
    rec = lambda wer: {"test_wer": wer, "attacker_weight": None}  # noqa: E731
    records = {rob.Cell("fedavg", "none", 0, 11): rec(0.30), rob.Cell("median", "none", 0, 11): rec(0.34),
               rob.Cell("fedavg", "none", 0, 22): rec(0.40), rob.Cell("median", "none", 0, 22): rec(0.36),
               rob.Cell("fedavg", "sign_flip", 1, 11): rec(0.90)}
    table = rob.report(bench.cfg, records, bench.k)
    assert "|median|34.0|—|—|—|—|+4.0|—|—|" in table  # seed 11 alone: not 35.0, and ΔWER paired on seed 11
    assert "|none|fedavg|30.0|40.0|+0.0|+0.0|" in table and "|none|median|34.0|36.0|+4.0|-4.0|" in table
    assert "sign_flip_f1|fedavg" not in table  # no decide seed there
    # Δ +4.0 and −4.0: mean 0, sd 4·√2, t(0.975, 1) = 12.706 → half-width 12.706 · 4 = 50.8
    assert "|none|median|34.0|36.0|+4.0|-4.0|+0.0 [-50.8, +50.8]|" in table


def test_the_decide_table_gives_the_paired_differences_mean_and_t_interval_over_seeds(bench):
    """Three seeds, Δ = +1, +2, +3 to the column's best: mean 2, sd 1, t(0.975, 2) = 4.303 → 2 ± 2.48.
    A rule with one seed of the pair shows its lone Δ."""
    bench.cfg.update(decide_seeds=[22, 33])
    rec = lambda wer: {"test_wer": wer, "attacker_weight": None}  # noqa: E731
    records = {rob.Cell("fedavg", "none", 0, 11): rec(0.30), rob.Cell("median", "none", 0, 11): rec(0.31),
               rob.Cell("fedavg", "none", 0, 22): rec(0.20), rob.Cell("median", "none", 0, 22): rec(0.22),
               rob.Cell("fedavg", "none", 0, 33): rec(0.25), rob.Cell("median", "none", 0, 33): rec(0.28),
               rob.Cell("fedavg", "sign_flip", 1, 11): rec(0.40), rob.Cell("median", "sign_flip", 1, 11): rec(0.35),
               rob.Cell("median", "sign_flip", 1, 22): rec(0.25)}
    table = rob.report(bench.cfg, records, bench.k)
    assert "|WER seed 11|WER seed 22|WER seed 33|Δ seed 11|Δ seed 22|Δ seed 33|mean Δ [95 % interval]|" in table
    assert "|none|median|31.0|22.0|28.0|+1.0|+2.0|+3.0|+2.0 [-0.5, +4.5]|" in table
    assert "|none|fedavg|30.0|20.0|25.0|+0.0|+0.0|+0.0|+0.0 [+0.0, +0.0]|" in table
    assert "|sign_flip_f1|median|35.0|25.0|—|+0.0|+0.0|—|+0.0 [+0.0, +0.0]|" in table  # its own column's best


def test_records_name_their_base_model_and_a_column_of_two_bases_is_marked_mixed(bench):
    """A base trained again on another machine is another start: the record keeps the base's sha256
    prefix, and the table says which base each column started from."""
    import hashlib

    rec = bench.run(rob.Cell("fedavg", "none", 0, 11))
    assert rec["base"] == hashlib.sha256(b"weights").hexdigest()[:8]  # fake_train's latest.pth
    committed = bench.results / "bases" / f"seed11_{rec['base']}.jsonl"
    assert committed.read_text() == (bench.out / "base_seed11" / "metrics.jsonl").read_text()
    old = {"test_wer": 0.5, "attacker_weight": None}  # a record from before bases were recorded
    records = {rob.Cell("fedavg", "none", 0, 11): rec, rob.Cell("median", "none", 0, 11): {**rec, "base": "0123abcd"},
               rob.Cell("fedavg", "sign_flip", 1, 11): old, rob.Cell("median", "sign_flip", 1, 11): old}
    row = next(line for line in rob.report(bench.cfg, records, bench.k).splitlines() if line.startswith("|base model|"))
    assert row == f"|base model|mixed: 0123abcd, {rec['base']}|{rob.UNRECORDED_BASE}|—|—|—||||"


def test_the_legend_says_which_alie_column_is_no_attack():
    legend = rob._legend({"attacks": {"alie": {}}, "attackers": [1, 4]}, 8)
    assert legend == ["alie: z_max = 0.00 at f = 1, 1.15 at f = 4 of K = 8 (0: the attackers send the honest mean itself, "
                      "which is no attack)"]


def test_cells_train_side_by_side_after_what_they_share_is_made_and_the_report_has_its_heat_map(bench, tmp_path):
    todo = rob.cells(bench.cfg)
    records = bench.run_all(todo)
    assert list(records) == todo and all(r["test_wer"] in (0.3, 0.4) for r in records.values())
    names = [c[0] for c in bench.calls]
    assert names[0] == "base_seed11" and names.count("base_seed11") == 1 and len(names) == 1 + len(todo)
    png = tmp_path / "table.png"
    rob.plot(bench.cfg, records, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![the attack table](table.png)" in rob.report(bench.cfg, records, bench.k)


def test_a_decide_seed_that_repeats_a_seed_is_refused(tmp_path):
    text = re.sub(r"decide_seeds: \[[0-9, ]+\]", "decide_seeds: [22, 11]", (conv.ROOT / "bench/robustness.yaml").read_text())
    assert "decide_seeds: [22, 11]" in text
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(ValueError, match="repeat seeds"):
        rob.load(tmp_path / "r.yaml")


def test_columns_to_train_are_named_in_their_order_and_a_wrong_name_is_refused(bench):
    assert rob.column_rank(bench.cfg, None) == {"none": 0, "sign_flip_f1": 1, "sign_flip_f2": 2, "shuffled_f1": 3, "shuffled_f2": 4}
    assert rob.column_rank(bench.cfg, "shuffled_f2,none") == {"shuffled_f2": 0, "none": 1}
    with pytest.raises(ValueError, match=r"unknown columns \['sign_flip_f4'\]"):
        rob.column_rank(bench.cfg, "none,sign_flip_f4")
    with pytest.raises(ValueError, match="names a column twice"):
        rob.column_rank(bench.cfg, "none,none")


def test_the_study_trains_the_named_columns_in_order_then_the_decide_seeds_unless_told_not_to(bench):
    rules = set(bench.cfg["rules"])
    records = rob.study(bench, rob.column_rank(bench.cfg, "sign_flip_f1,none"), rules, train=True, decide=False)
    # the cells in --columns' order, every rule of a column before the next (side by side they may start in any order)
    assert [c.name for c in records] == ["fedavg/sign_flip_f1_seed11", "median/sign_flip_f1_seed11",
                                         "fedavg/none_seed11", "median/none_seed11"]
    assert sorted(c[0] for c in bench.calls) == ["base_seed11", "none_seed11", "none_seed11", "sign_flip_f1_seed11", "sign_flip_f1_seed11"]
    bench.calls.clear()
    assert rob.study(bench, rob.column_rank(bench.cfg, "none"), rules, train=False, decide=True) == records  # committed only
    assert bench.calls == []
    records = rob.study(bench, rob.column_rank(bench.cfg, "none"), {"fedavg"}, train=True, decide=True)
    # fedavg 30 % and median 40 %: only fedavg is within decide_margin 5 of the column's best
    assert [c[0] for c in bench.calls] == ["base_seed22", "none_seed22"] and rob.Cell("fedavg", "none", 0, 22) in records


def test_a_cell_whose_model_diverges_is_recorded_with_its_last_model_and_marked(bench, monkeypatch):
    """fl_train's EXIT_DIVERGED (convergence.Diverged) is a result: the cell keeps the WER of the
    last round it counted and the round it stopped at; a run that fails otherwise still stops the study."""
    train, decode, decoded = bench.train, conv.decode_test, []

    def diverging(exp, fl_config, listing, seed, overrides, asr_config):
        train(exp, fl_config, listing, seed, overrides, asr_config)
        if "sign_flip" in exp.name:
            counted = 3 if exp.parent.name == "fedavg" else 0
            rows = (exp / "metrics.jsonl").read_text().splitlines()[:counted]
            (exp / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
            raise conv.Diverged(f"{exp}: the model diverged")

    monkeypatch.setattr(bench, "train", diverging)
    monkeypatch.setattr(conv, "decode_test", lambda exp, data, rounds: decoded.append(rounds) or decode(exp, data, rounds))
    rec = bench.run(rob.Cell("fedavg", "sign_flip", 1, 11))
    assert rec["diverged_round"] == 4 and decoded == [[3]] and rec["test_wer"] == 0.3
    assert bench.run(rob.Cell("fedavg", "none", 0, 11))["diverged_round"] is None
    records = {c: bench.run(c) for c in [rob.Cell("fedavg", "none", 0, 11), rob.Cell("fedavg", "sign_flip", 1, 11),
                                         rob.Cell("fedavg", "sign_flip", 1, 22)]}
    table = rob.report(bench.cfg, records, bench.k)
    assert "|fedavg|30.0|30.0 w×0.50 div@4|" in table
    assert "|sign_flip_f1|fedavg|30.0 div@4|30.0 div@4|" in table  # the decide seeds' table marks it too
    with pytest.raises(RuntimeError, match="diverged in its first round"):
        bench.run(rob.Cell("median", "sign_flip", 1, 11))

    def failing(exp, *args):
        raise RuntimeError(f"{exp}: fl_train exited 1")

    monkeypatch.setattr(bench, "train", failing)
    with pytest.raises(RuntimeError, match="exited 1"):
        bench.run(rob.Cell("median", "sign_flip", 2, 11))
    assert not (bench.results / "runs" / "median").exists()
