"""Convergence benchmark: rounds to FedAvg's final dev WER, and WERR at equal rounds.

Runs every (method, learning rate) of bench/convergence.yaml on a federation with
corrupted clients, picks each method's best learning rate by final dev loss, reruns
those on the clean federation, then reports rounds-to-target, speed-ups and WERR
as a table, a PNG and one JSON line. Dev and test WER are CTC-greedy (the per-round
validation metric of fl_train), measured the same way for every method.

    .venv/bin/python bench/convergence.py --config bench/convergence.yaml --out bench/out/convergence
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("convergence")


def fl_train_command(cfg: dict, recipe: Path, clients: Path, method: dict, lr: float, out: Path) -> list[str]:
    overrides = [f"{k}={v}" for k, v in cfg["common"].items()] + [f"{method['lr_key']}={lr}"]
    return [
        sys.executable, "-m", "fl_lib.bin.fl_train",
        "--asr_config", str(recipe / cfg["asr_config"]),
        "--fl_config", str(recipe / method["fl_config"]),
        "--train_clients", str(clients),
        "--dev_cuts", str(recipe / cfg["dev_cuts"]),
        "--token_list", str(recipe / "data/token_list/char/tokens.txt"),
        "--bpemodel", str(recipe / "data/token_list/char/bpe.model"),
        "--feats_stats", str(recipe / "exp/asr_stats/feats_stats.npz"),
        "--seed", str(cfg["seed"]), "--output_dir", str(out), *overrides,
    ]


def run_all(jobs: list[tuple[list[str], Path]], parallel: int) -> None:
    def one(job):
        cmd, out = job
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(out / "train.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"{out}: fl_train exited {rc}; see {out / 'train.log'}")
        logger.info(f"done {out} in {time.time() - t0:.0f}s")

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, jobs))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def rounds_to(rows: list[dict], target: float, key: str = "dev_wer"):
    """First round whose dev metric (lower is better) reaches the target."""
    return next((r["round"] for r in rows if r[key] is not None and r[key] <= target + 1e-12), None)


def test_wer(exp: Path, recipe: Path, test_cuts: Path) -> float:
    from fl_lib.data.dataset import make_dataloader
    from fl_lib.data.tokenizer import Tokenizer
    from fl_lib.espnet_env import asr_task
    from fl_lib.fl.validation import evaluate

    model, _ = asr_task().build_model_from_file(exp / "config.yaml", exp / "latest.pth", "cpu")
    tok = Tokenizer(recipe / "data/token_list/char/bpe.model", recipe / "data/token_list/char/tokens.txt")
    return evaluate(model, make_dataloader(test_cuts, tok, max_duration=120.0), tok)["wer"]


def relative_weight(rows: list[dict], client_ids: set[str]) -> float | None:
    """Mean aggregation weight of these clients when sampled, relative to a uniform 1/K."""
    rel = [w * len(r["clients"]) for r in rows for c, w in zip(r["clients"], r["weights"]) if c in client_ids]
    return sum(rel) / len(rel) if rel else None


def agent_relative_weight(rows: list[dict], client_ids: set[str]) -> float | None:
    """rl_dga: the same for the weights its agent proposed, applied or not (None for other strategies)."""
    rel = [w * len(r["clients"]) for r in rows for c, w in r.get("strategy", {}).get("agent_weights", {}).items() if c in client_ids]
    return sum(rel) / len(rel) if rel else None


def held_out_utts(exp: Path) -> int | None:
    """Dev utterances an rl_dga run moved to its held-out set: its dev metrics are on the rest."""
    return yaml.safe_load((exp / "fl_config.yaml").read_text())["strategy"].get("held_out_utts")


def summarize(fed: str, runs: dict, recipe: Path, test_cuts: Path, corrupted: set[str]) -> dict:
    """runs: method -> (lr, exp dir) of its best learning rate."""
    rows = {m: metrics(exp) for m, (_, exp) in runs.items()}
    final = {m: r[-1]["dev_wer"] for m, r in rows.items()}
    final_loss = {m: r[-1]["dev_loss"] for m, r in rows.items()}
    target, target_loss = final["fedavg"], final_loss["fedavg"]
    # An untrained model outputs nothing: 100% WER. A target at or above that is
    # "reached" in round 1 by every method and measures nothing.
    wer_target_valid = target < 1.0
    base_rounds = rounds_to(rows["fedavg"], target) if wer_target_valid else None
    base_rounds_loss = rounds_to(rows["fedavg"], target_loss, "dev_loss")
    test = {m: test_wer(exp, recipe, test_cuts) for m, (_, exp) in runs.items()}
    out = {"federation": fed, "target_dev_wer": target, "wer_target_valid": wer_target_valid,
           "target_dev_loss": target_loss, "rounds": len(rows["fedavg"]), "methods": {}}
    for m in runs:
        reached = rounds_to(rows[m], target) if wer_target_valid else None
        reached_loss = rounds_to(rows[m], target_loss, "dev_loss")
        out["methods"][m] = {
            "lr": runs[m][0],
            "rounds_to_target": reached,
            "speedup": (base_rounds / reached) if reached and base_rounds else None,
            "rounds_to_target_loss": reached_loss,
            "speedup_loss": (base_rounds_loss / reached_loss) if reached_loss else None,
            "final_dev_loss": final_loss[m],
            "final_dev_acc": rows[m][-1]["dev_acc"],
            "final_dev_wer": final[m],
            "test_wer": test[m],
            "dev_werr": (target - final[m]) / target if target else None,
            "test_werr": (test["fedavg"] - test[m]) / test["fedavg"] if test["fedavg"] else None,
            "corrupted_rel_weight": relative_weight(rows[m], corrupted),
            "corrupted_agent_rel_weight": agent_relative_weight(rows[m], corrupted),
            "dev_held_out_utts": held_out_utts(runs[m][1]),
        }
    return out, rows


def plot(curves: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(curves), figsize=(6 * len(curves), 8), squeeze=False)
    for col, (fed, rows) in enumerate(curves.items()):
        for row, (key, label, scale) in enumerate((("dev_wer", "dev WER % (CTC greedy)", 100), ("dev_loss", "dev loss", 1))):
            ax = axes[row][col]
            for m, r in rows.items():
                ax.plot([x["round"] for x in r], [scale * x[key] for x in r], marker="o", ms=3, label=m)
            ax.set(title=f"federation: {fed}", xlabel="round", ylabel=label)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)


def markdown(summaries: list[dict]) -> str:
    lines = []
    for s in summaries:
        unreachable = "" if s["wer_target_valid"] else " (not below the 100% of an empty output: no WER target)"
        lines += [
            f"### federation: {s['federation']} ({s['rounds']} rounds; targets = FedAvg's final dev WER "
            f"{100 * s['target_dev_wer']:.1f}%{unreachable} and dev loss {s['target_dev_loss']:.2f})",
            "",
            "|method|lr|rounds to target WER|speed-up (WER)|rounds to target loss|speed-up (loss)|final dev loss|final dev acc %|final dev WER %|test WER %|dev WERR %|test WERR %|corrupted clients' weight ×uniform|rl_dga agent's own weight for them ×uniform|",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m, v in s["methods"].items():
            f = lambda x, pct=True: "n/a" if x is None else (f"{100 * x:.1f}" if pct else f"{x:.2f}")
            lines.append(
                f"|{m}|{v['lr']}|{v['rounds_to_target'] or ('not reached' if s['wer_target_valid'] else 'n/a')}|{f(v['speedup'], False)}|"
                f"{v['rounds_to_target_loss'] or 'not reached'}|{f(v['speedup_loss'], False)}|"
                f"{v['final_dev_loss']:.2f}|{f(v['final_dev_acc'])}|"
                f"{f(v['final_dev_wer'])}|{f(v['test_wer'])}|{f(v['dev_werr'])}|{f(v['test_werr'])}|"
                f"{f(v['corrupted_rel_weight'], False)}|{f(v['corrupted_agent_rel_weight'], False)}|"
            )
        held = {m: v["dev_held_out_utts"] for m, v in s["methods"].items() if v["dev_held_out_utts"]}
        for m, n in held.items():
            lines.append(f"\n{m}: dev metrics are on dev minus the {n} utterances it holds out to score its candidates; test WER is on the same test set as every method.")
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
    from fl_lib.data.corrupt import corrupt_clients

    t0 = time.time()
    fed_bad = f"corrupt{cfg['num_corrupted']}"
    corrupted = corrupt_clients(clean, args.out / fed_bad / "clients", cfg["num_corrupted"], cfg["seed"])
    methods = cfg["methods"]

    def exp(fed, m, lr):
        return args.out / fed / f"{m}_lr{lr}"

    grid = [(m, lr) for m, spec in methods.items() for lr in spec["lrs"]]
    if not args.report_only:
        run_all([(fl_train_command(cfg, recipe, corrupted, methods[m], lr, exp(fed_bad, m, lr)), exp(fed_bad, m, lr)) for m, lr in grid], cfg["parallel_jobs"])
    # Best learning rate by final dev loss: within this budget the CTC-greedy WER of
    # most runs is still near 100%, where a model that outputs nothing scores best.
    best = {m: min(spec["lrs"], key=lambda lr: metrics(exp(fed_bad, m, lr))[-1]["dev_loss"]) for m, spec in methods.items()}
    if not args.report_only:
        run_all([(fl_train_command(cfg, recipe, clean, methods[m], best[m], exp("clean", m, best[m])), exp("clean", m, best[m])) for m in methods], cfg["parallel_jobs"])

    bad_ids = set((corrupted.parent / "corrupted.txt").read_text().split())
    summaries, curves = [], {}
    for fed in (fed_bad, "clean"):
        s, rows = summarize(fed, {m: (best[m], exp(fed, m, best[m])) for m in methods}, recipe, recipe / cfg["test_cuts"], bad_ids)
        summaries.append(s)
        curves[fed] = rows
    grid_table = {
        m: {str(lr): {k: round(metrics(exp(fed_bad, m, lr))[-1][k], 4) for k in ("dev_loss", "dev_wer")} for lr in methods[m]["lrs"]}
        for m in methods
    }
    png = args.out / "convergence.png"
    plot(curves, png)
    report = args.out / "report.md"
    report.write_text(
        "# Convergence benchmark\n\n" + markdown(summaries)
        + "\n### learning-rate grid (final dev loss and dev WER on the corrupted federation; chosen by dev loss)\n\n```\n" + json.dumps(grid_table, indent=1) + "\n```\n"
        + f"\n![dev WER per round]({png.name})\n"
    )
    print(json.dumps({"summaries": summaries, "lr_grid_final": grid_table, "plot": str(png), "report": str(report), "seconds": round(time.time() - t0)}))


if __name__ == "__main__":
    main()
