"""Convergence benchmark: rounds to FedAvg's final test WER, speed-up and WERR, per method.

Protocol (bench/convergence.yaml):
1. Tune: every (method, learning rate) of the grid trains on the clean federation
   with the tuning seed; each method keeps the learning rate with the lowest final
   dev WER (CTC greedy). Dev is the only set that choice sees.
2. Report: each method at its chosen learning rate, on the clean federation and on
   one where `num_corrupted` clients have shuffled transcripts, with every seed of
   `seeds` (the tuning run is reused where seed and federation match).
3. Score: every validated round's checkpoint is decoded (CTC greedy) on test-clean.
   FedAvg's final test WER (mean over seeds) is the target; a method's rounds to
   target is the first validated round whose seed-mean test WER reaches it. The
   study counts only if that target is below `max_target_wer`.

Outputs report.md, convergence.png (test WER per round) and one JSON line.

    bench/convergence.sh [--out bench/out/convergence] [--report_only]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("convergence")


def fl_overrides(cfg: dict, method: dict, lr: float) -> list[str]:
    """fl_train's key=value overrides for one run: `common`, then the method's `overrides`, then its lr."""
    settings = {**cfg["common"], **method.get("overrides", {}), method["lr_key"]: lr}
    return [f"{k}={json.dumps(v)}" for k, v in settings.items()]


def fl_train_command(cfg: dict, recipe: Path, clients: Path, method: dict, lr: float, seed: int, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "fl_lib.bin.fl_train",
        "--asr_config", str(recipe / cfg["asr_config"]),
        "--fl_config", str(recipe / method["fl_config"]),
        "--train_clients", str(clients),
        "--dev_cuts", str(recipe / cfg["dev_cuts"]),
        "--token_list", str(recipe / "data/token_list/char/tokens.txt"),
        "--bpemodel", str(recipe / "data/token_list/char/bpe.model"),
        "--feats_stats", str(recipe / "exp/asr_stats/feats_stats.npz"),
        "--client_jobs", "1",  # parallel_jobs runs side by side, one core each
        "--seed", str(seed), "--output_dir", str(out), *fl_overrides(cfg, method, lr),
    ]


def finished(out: Path, rounds: int) -> bool:
    """True when `out` holds a run that reached its last round: it is reused as it is.

    fl_train itself would refuse to resume it from another checkout, since its config
    records absolute data paths; the run directory's name fixes method, lr and seed."""
    return (out / "metrics.jsonl").is_file() and metrics(out)[-1]["round"] >= rounds


def run_all(jobs: list[tuple[list[str], Path]], parallel: int, rounds: int) -> None:
    """Run the fl_train commands, `parallel` at a time; a killed run resumes from its checkpoint."""

    def one(job):
        cmd, out = job
        if finished(out, rounds):
            logger.info(f"reusing finished run {out}")
            return
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(out / "bench.log", "a") as log:  # fl_train resumes a killed run from checkpoint.pth
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"{out}: fl_train exited {rc}; see {out / 'bench.log'}")
        logger.info(f"done {out} in {time.time() - t0:.0f}s")

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, jobs))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_minutes(out: Path) -> float:
    """Wall minutes fl_train spent on this run's rounds (training and validation), from metrics.jsonl."""
    return sum(row["seconds"] for row in metrics(out)) / 60


def test_curve(exp: Path, recipe: Path, test_cuts: Path) -> dict[int, float]:
    """{round: CTC-greedy test WER} of every kept round checkpoint, cached in exp/test_curve.json."""
    cache = exp / "test_curve.json"
    if cache.exists():
        return {int(k): v for k, v in json.loads(cache.read_text()).items()}
    from fl_lib.asr.average import round_checkpoints
    from fl_lib.data.dataset import make_dataloader
    from fl_lib.data.tokenizer import Tokenizer
    from fl_lib.espnet_env import asr_task
    from fl_lib.fl.validation import evaluate

    tok = Tokenizer(recipe / "data/token_list/char/bpe.model", recipe / "data/token_list/char/tokens.txt")
    curve = {}
    for rnd, path in round_checkpoints(exp).items():
        model, _ = asr_task().build_model_from_file(exp / "config.yaml", path, "cpu")
        curve[rnd] = evaluate(model, make_dataloader(test_cuts, tok, max_duration=120.0), tok)["wer"]
    cache.write_text(json.dumps(curve))
    return curve


def relative_weight(rows: list[dict], client_ids: set[str]) -> float | None:
    """Mean aggregation weight of these clients when sampled, relative to a uniform 1/K."""
    rel = [w * len(r["clients"]) for r in rows for c, w in zip(r["clients"], r["weights"]) if c in client_ids]
    return sum(rel) / len(rel) if rel else None


def agent_relative_weight(rows: list[dict], client_ids: set[str]) -> float | None:
    """rl_dga: the same for the weights its agent proposed, applied or not (None for other strategies)."""
    rel = [w * len(r["clients"]) for r in rows for c, w in r.get("strategy", {}).get("agent_weights", {}).items() if c in client_ids]
    return sum(rel) / len(rel) if rel else None


def held_out_utts(exp: Path) -> int | None:
    """Dev utterances an rl_dga run moved to its held-out set: its dev WER (the lr choice) is on the rest."""
    return yaml.safe_load((exp / "fl_config.yaml").read_text())["strategy"].get("held_out_utts")


def mean_curve(curves: list[dict[int, float]]) -> dict[int, float]:
    """Seed-mean test WER over the rounds every seed has."""
    rounds = sorted(set.intersection(*(set(c) for c in curves)))
    return {r: statistics.fmean(c[r] for c in curves) for r in rounds}


def rounds_to(curve: dict[int, float], target: float) -> int | None:
    return next((r for r, wer in sorted(curve.items()) if wer <= target + 1e-12), None)


def summarize(fed: str, runs: dict[str, list[Path]], lrs: dict, curves: dict, corrupted: set[str], max_target: float) -> dict:
    """runs: method -> exp dirs (one per seed); curves: exp dir -> test curve."""
    mean = {m: mean_curve([curves[e] for e in exps]) for m, exps in runs.items()}
    finals = {m: [curves[e][max(curves[e])] for e in exps] for m, exps in runs.items()}
    target = statistics.fmean(finals["fedavg"])
    valid = target < max_target
    base = rounds_to(mean["fedavg"], target)
    out = {"federation": fed, "target_test_wer": target, "valid": valid, "methods": {}}
    for m, exps in runs.items():
        reached = rounds_to(mean[m], target)
        final = statistics.fmean(finals[m])
        out["methods"][m] = {
            "lr": lrs[m],
            "seeds": len(exps),
            "final_test_wer": final,
            "final_test_wer_spread": (max(finals[m]) - min(finals[m])) / 2,  # half the range over seeds
            "final_test_wers": finals[m],
            "rounds_to_target": reached,
            "speedup": base / reached if reached and base else None,
            "werr": (target - final) / target if target else None,
            "corrupted_rel_weight": relative_weight([row for e in exps for row in metrics(e)], corrupted) if corrupted else None,
            "corrupted_agent_rel_weight": agent_relative_weight([row for e in exps for row in metrics(e)], corrupted) if corrupted else None,
            "dev_held_out_utts": held_out_utts(exps[0]),
        }
    return out, mean


def plot(mean_curves: dict[str, dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(mean_curves), figsize=(6 * len(mean_curves), 4.5), squeeze=False)
    for ax, (fed, by_method) in zip(axes[0], mean_curves.items()):
        for m, curve in by_method.items():
            ax.plot(list(curve), [100 * w for w in curve.values()], marker="o", ms=3, label=m)
        ax.set(title=f"federation: {fed}", xlabel="round", ylabel="test-clean WER % (CTC greedy, seed mean)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)


def markdown(summaries: list[dict], max_target: float) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}"

    lines = []
    for s in summaries:
        verdict = "" if s["valid"] else f" — **not below {100 * max_target:.0f} %: this study does not count**"
        lines += [
            f"### federation: {s['federation']} (target = FedAvg's final test-clean WER {pct(s['target_test_wer'])} %{verdict})",
            "",
            "|method|lr (chosen on dev)|seeds|final test WER % (mean ± half range)|rounds to target|speed-up|WERR % vs FedAvg|corrupted clients' weight ×uniform|rl_dga agent's own weight for them ×uniform|",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m, v in s["methods"].items():
            speed = "n/a" if v["speedup"] is None else f"{v['speedup']:.2f}"
            weight = "n/a" if v["corrupted_rel_weight"] is None else f"{v['corrupted_rel_weight']:.2f}"
            agent = "n/a" if v["corrupted_agent_rel_weight"] is None else f"{v['corrupted_agent_rel_weight']:.2f}"
            lines.append(
                f"|{m}|{v['lr']}|{v['seeds']}|{pct(v['final_test_wer'])} ± {pct(v['final_test_wer_spread'])}|"
                f"{v['rounds_to_target'] or 'not reached'}|{speed}|{pct(v['werr'])}|{weight}|{agent}|"
            )
        for m, v in s["methods"].items():
            if v["dev_held_out_utts"]:
                lines.append(f"\n{m} chose its learning rate on dev minus the {v['dev_held_out_utts']} utterances it holds "
                             "out to score its candidate updates; its test WER is on the same test-clean as every method.")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "bench/convergence.yaml")
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/convergence")
    p.add_argument("--report_only", action="store_true", help="summarize the runs already in --out, train nothing")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s")
    cfg = yaml.safe_load(args.config.read_text())
    recipe = ROOT / cfg["recipe_dir"]
    clean = recipe / cfg["train_clients"]
    if not clean.exists():
        sys.exit(f"{clean} not found: run {recipe}/run.sh --stage 0 --stop_stage 4 first")
    common = cfg["common"]
    rounds, every = common["rounds"], common["validate_every"]
    if common["keep_checkpoints"] < math.ceil(rounds / every):
        sys.exit(f"common.keep_checkpoints must keep every validated round (>= {math.ceil(rounds / every)}) for the test curves")
    from fl_lib.data.corrupt import corrupt_clients

    t0 = time.time()
    methods, seeds, tune_seed = cfg["methods"], cfg["seeds"], cfg["tune_seed"]
    bad = f"corrupt{cfg['num_corrupted']}"
    listings = {"clean": clean, bad: corrupt_clients(clean, args.out / bad / "clients", cfg["num_corrupted"], tune_seed)}
    bad_ids = set((listings[bad].parent / "corrupted.txt").read_text().split())

    def exp(fed, m, lr, seed):
        return args.out / fed / f"{m}_lr{lr}_seed{seed}"

    def job(fed, m, lr, seed):
        return fl_train_command(cfg, recipe, listings[fed], methods[m], lr, seed, exp(fed, m, lr, seed)), exp(fed, m, lr, seed)

    grid = [(m, lr) for m, spec in methods.items() for lr in spec["lrs"]]
    tuning = [("clean", m, lr, tune_seed) for m, lr in grid]
    chosen = all(len(spec["lrs"]) == 1 for spec in methods.values())  # nothing to tune: one pool keeps both cores busy
    if not args.report_only:
        every = tuning + [(fed, m, lr, s) for fed in listings for m, lr in grid for s in seeds] if chosen else tuning
        run_all([job(*r) for r in dict.fromkeys(every)], cfg["parallel_jobs"], rounds)
    grid_dev = {m: {lr: metrics(exp("clean", m, lr, tune_seed))[-1]["dev_wer"] for lr in spec["lrs"]} for m, spec in methods.items()}
    best = {m: min(by_lr, key=by_lr.get) for m, by_lr in grid_dev.items()}
    report_runs = [(fed, m, best[m], s) for fed in listings for m in methods for s in seeds]
    if not args.report_only and not chosen:
        run_all([job(*r) for r in report_runs if r not in tuning], cfg["parallel_jobs"], rounds)

    test_cuts = recipe / cfg["test_cuts"]
    curves = {exp(*r): test_curve(exp(*r), recipe, test_cuts) for r in report_runs}
    summaries, means = [], {}
    for fed in listings:
        runs = {m: [exp(fed, m, best[m], s) for s in seeds] for m in methods}
        s, means[fed] = summarize(fed, runs, best, curves, bad_ids if fed == bad else set(), cfg["max_target_wer"])
        summaries.append(s)
    study = [exp(*r) for r in dict.fromkeys(tuning + report_runs)]
    minutes = sum(run_minutes(e) for e in study)
    cost = {"runs": len(study), "run_minutes": round(minutes, 1), "wall_minutes_side_by_side": round(minutes / cfg["parallel_jobs"], 1)}
    png = args.out / "convergence.png"
    plot(means, png)
    report = args.out / "report.md"
    report.write_text(
        "# Convergence benchmark\n\n" + markdown(summaries, cfg["max_target_wer"])
        + "\n### learning-rate grid: final dev WER (CTC greedy) on the clean federation, seed "
        + f"{tune_seed}; each method keeps its lowest\n\n```\n" + json.dumps(grid_dev, indent=1) + "\n```\n"
        + f"\n### cost\n\n{cost['runs']} runs, {cost['run_minutes']} minutes of fl_train rounds in all, each at the pace "
        + f"of the day it ran: about {cost['wall_minutes_side_by_side']} minutes at that pace with {cfg['parallel_jobs']} "
        + "runs side by side (test decoding not included).\n"
        + f"\n![test-clean WER per round]({png.name})\n"
    )
    print(json.dumps({"summaries": summaries, "lr_grid_dev_wer": grid_dev, "cost": cost, "plot": str(png), "report": str(report), "seconds": round(time.time() - t0)}))


if __name__ == "__main__":
    main()
