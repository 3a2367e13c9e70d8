"""The privacy-utility table: DP-FedAvg's acoustic-model WER against its ε, measured on the
64-speaker federation, and the ε the same noise per coordinate would cost a large population
on paper (fl_lib.fl.privacy.plan), RDP and PLD side by side.

For each seed and point of bench/privacy.yaml: fl_train for `rounds` rounds (FedAvg, equal
weights, the convergence study's client settings), then the CTC-greedy WER of its best-dev
round (best_criterion: wer) on dev-clean, test-clean and test-other, the acoustic model alone.
Each finished run leaves a compact record (config, metrics.jsonl, WERs, the last ledger) under
bench/results/privacy/runs/; a rerun trains only the points without one. A run whose model
diverged (fl_train's exit status EXIT_DIVERGED: the noise made every client's update non-finite)
is a result, not a crash: its record says where it stopped (`stopped`), and its WERs are those
of its best-dev round before that.

    bench/privacy.sh [--report_only] [--corpora DIR]
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convergence  # noqa: E402
import curves  # noqa: E402

ROOT = convergence.ROOT
SETS = ("dev-clean", "test-clean", "test-other")
MIN_PLAN_SIGMA = 0.1  # below it the on-paper ε is astronomical; dp-accounting's PLD ran > 20 min for σ ≈ 0.01
logger = logging.getLogger("privacy")


def load(path: Path) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    keys = {"convergence_config", "seeds", "rounds", "fl_config", "common", "points", "plan"}
    if set(cfg) != keys:
        raise ValueError(f"{path}: unknown keys {sorted(set(cfg) - keys)}, missing keys {sorted(keys - set(cfg))}")
    return cfg


def overrides(study_cfg: dict, cfg: dict, point: dict) -> list[str]:
    """fl_train's overrides: the convergence study's common settings, this bench's, the point's privacy keys."""
    settings = {**study_cfg["common"], **cfg["common"], "rounds": cfg["rounds"], "keep_checkpoints": 1, **point}
    return [f"{k}={json.dumps(v)}" for k, v in settings.items()]


def decode_sets(exp: Path, data: Path) -> dict[str, float]:
    """CTC-greedy WER of exp's best-dev model on each of SETS."""
    from fl_lib.data.dataset import make_dataloader
    from fl_lib.data.tokenizer import Tokenizer
    from fl_lib.espnet_env import asr_task
    from fl_lib.fl.validation import evaluate

    tok = Tokenizer(data / "token_list/char/bpe.model", data / "token_list/char/tokens.txt")
    model, _ = asr_task().build_model_from_file(exp / "config.yaml", exp / "valid.acc.best.pth", "cpu")
    return {s: evaluate(model, make_dataloader(data / f"sets/{s}.jsonl.gz", tok, max_duration=120.0), tok)["wer"] for s in SETS}


def run_point(study: convergence.Study, cfg: dict, name: str, point: dict, seed: int, out: Path, results: Path) -> dict:
    record = results / "runs" / f"{name}_seed{seed}" / "record.json"
    fingerprint = {"point": point, "overrides": overrides(study.cfg, cfg, point), "fl_config": cfg["fl_config"]}
    if record.exists():
        rec = json.loads(record.read_text())
        if rec["fingerprint"] != json.loads(json.dumps(fingerprint)):
            raise ValueError(f"{record} was made with other settings; remove {record.parent} to run it again")
        return rec
    exp = out / f"{name}_seed{seed}"
    exp.mkdir(parents=True, exist_ok=True)
    diverged = False
    try:
        study._call(study.fl_train_command(study.recipe / study.cfg["asr_config"], cfg["fl_config"],
                                           study.listing(convergence.CLEAN, seed), seed, exp, overrides(study.cfg, cfg, point)), exp)
    except convergence.Diverged:
        # valid.acc.best.pth follows every round until the first validation: look for a validated round
        if not any(r["dev_wer"] is not None for r in convergence.metrics(exp)):
            raise RuntimeError(f"{exp}: the model diverged before its first validation: no best-dev model to report") from None
        diverged = True
        logger.warning("%s seed %d diverged", name, seed)
    rows = convergence.metrics(exp)
    stopped = {"round": rows[-1]["round"], "last_clip": rows[-1].get("privacy", {}).get("next_clip")} if diverged else None
    rec = {"stopped": stopped, "name": name, "seed": seed, "fingerprint": fingerprint, "wer": decode_sets(exp, study.corpus(seed) / "data"),
           "best_dev_round": min((r for r in rows if r.get("dev_wer") is not None), key=lambda r: r["dev_wer"])["round"],
           "privacy": rows[-1].get("privacy", {}), "minutes": round(sum(r["train_seconds"] for r in rows) / 60, 2)}
    record.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(exp / "metrics.jsonl", record.parent / "metrics.jsonl")
    record.write_text(json.dumps(rec, sort_keys=True) + "\n")
    logger.info(f"finished {name} seed {seed}: {rec['wer']}")
    return rec


def sum_sigma(ledger: dict) -> float:
    """The noise multiplier of the sum: σ itself, or with adaptive clipping the larger σ that pays for the count."""
    return ledger.get("sum_noise_multiplier", ledger["noise_multiplier"])


def report(cfg: dict, records: list[dict], k: int) -> str:
    from fl_lib.fl.privacy import plan

    def eps(x: float) -> str:
        return f"{x:.3g}" if math.isfinite(x) else "inf"

    lines = ["# Privacy-utility table (bench/privacy.py)", "",
             f"FedAvg with equal weights, {cfg['rounds']} rounds, K = {k} clients per round of 64, the convergence study's "
             "client settings; CTC-greedy WER of the best-dev round, acoustic model alone. ε at δ = 1/N^1.1 (RDP, "
             "replace-one, cohorts without replacement). noise/coord = σ/K: the noise std per coordinate of the averaged "
             "update (the sum's noise multiplier over K), in units of the clip C.", "",
             "|point|seed|σ|final clip C|ε|noise/coord|" + "|".join(f"{s} WER %" for s in SETS) + "|best round|minutes|stopped|",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        p = r["privacy"]
        cells = [f"{p['noise_multiplier']:g}", f"{p['next_clip']:.3g}", eps(p["epsilon"]), f"{sum_sigma(p) / k:.2g}"] if p \
            else ["—", "—", "∞", "0"]
        cells += [f"{100 * r['wer'][s]:.1f}" for s in SETS] + [str(r["best_dev_round"]), str(r["minutes"])]
        stop = r.get("stopped")
        cells.append("" if not stop else f"diverged: stopped at round {stop['round']}, clip {stop['last_clip']:.3g}")
        lines.append("|" + "|".join([r["name"], str(r["seed"]), *cells]) + "|")
    lines += ["", f"## Mean over seeds, 95 % Student-t interval ({cfg['seeds']}; a point with fewer seeds says so)", "",
              "|point|seeds|ε|" + "|".join(f"{s} WER %" for s in SETS) + "|", "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["name"] for r in records):
        runs = [r for r in records if r["name"] == name]
        cells = [convergence.interval_text(curves.mean_interval([r["wer"][s] for r in runs]).__dict__) for s in SETS]
        epsilons = {eps(r["privacy"]["epsilon"]) if r["privacy"] else "∞" for r in runs}
        lines.append(f"|{name}|{len(runs)} of {len(cfg['seeds'])}|{', '.join(sorted(epsilons))}|" + "|".join(cells) + "|")
    lines += ["", "## On paper: the same noise per coordinate at a large population", "",
              f"σ = σ₀·K'/{k} keeps each point's noise per coordinate at cohorts of K'; {cfg['rounds']} rounds, "
              f"δ = {cfg['plan']['delta']:g} (`python -m fl_lib.bin.dp_plan`).", "",
              "|point|population N|cohort K'|σ|ε fixed-size RDP|ε Poisson RDP|ε Poisson PLD|", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["name"] for r in records if r["privacy"]):
        sigma = next(sum_sigma(r["privacy"]) for r in records if r["name"] == name)
        for n in cfg["plan"]["populations"]:
            for cohort in cfg["plan"]["cohorts"]:  # on paper the clip is fixed: the sum gets the whole σ
                if sigma * cohort / k < MIN_PLAN_SIGMA:
                    lines.append(f"|{name}|{n:,}|{cohort:,}|{sigma * cohort / k:.3g}|not computed: σ < {MIN_PLAN_SIGMA} "
                                 "(ε beyond any use; PLD ran over 20 minutes to say so)|||")
                    continue
                x = plan(n, cohort, cfg["rounds"], cfg["plan"]["delta"], sigma * cohort / k)
                lines.append(f"|{name}|{n:,}|{cohort:,}|{x['noise_multiplier']:.3g}|{eps(x['epsilon_uniform_rdp'])}|"
                             f"{eps(x['epsilon_poisson_rdp'])}|{eps(x['epsilon_poisson_pld'])}|")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = convergence.study_bench_parser("privacy", __doc__)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s")
    cfg = load(args.config)
    study = convergence.Study(convergence.load_study(ROOT / cfg["convergence_config"]), args.corpora, args.results)
    records = []
    for seed in cfg["seeds"]:
        if not args.report_only and not study.listing(convergence.CLEAN, seed).exists():
            study.prepare(seed)  # only when missing: the corpora may be a running study's
        for name, point in cfg["points"].items():
            path = args.results / "runs" / f"{name}_seed{seed}" / "record.json"
            if args.report_only and not path.exists():
                continue
            records.append(run_point(study, cfg, name, point, seed, args.out, args.results))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "report.md").write_text(report(cfg, records, study.cfg["common"]["clients_per_round"]))
    print(json.dumps({"records": len(records), "report": str(args.results / "report.md")}))


if __name__ == "__main__":
    main()
