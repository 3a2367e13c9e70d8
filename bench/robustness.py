"""The attack table: each aggregation rule's acoustic model under each attack (bench/robustness.yaml).

Per seed, one FedAvg run on the clean 64-speaker federation (`base_rounds`) gives the model every
cell starts from (ESPnet's init_param). A cell trains `rounds` more rounds with one rule under one
attack and f attackers among the K clients of each round:
- an update attack (attack.*): f of each round's sampled clients send forged updates;
- data poisoning: f·N/K of the N clients have shuffled or random transcripts (f per round on average).
The table gives the CTC-greedy test-clean WER of each cell's last round (a cell whose model
diverges keeps its last counted round, marked div@r); the clean column's cost
against FedAvg (ΔWER, CPU-seconds per round) and the server's own CPU-seconds per round; and the
attackers' mean weight relative to a uniform 1/K where the rule weights clients. Every cell runs
on `seeds`; the cells that decide a column's ranking (within `decide_margin` WER points of the
column's best on those seeds) run again on `decide_seeds`, reported in a table of their own, paired
by seed (a seed is its own corpus). Cells train `parallel_jobs` (the convergence study's) side by
side. Each finished cell leaves a compact record under bench/results/robustness/runs/; a rerun
trains only the missing cells. The report is report.md and table.png.

    bench/robustness.sh [--report_only] [--corpora DIR] [--only RULE,...] [--columns COLUMN,...]
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convergence  # noqa: E402
import curves  # noqa: E402

ROOT = convergence.ROOT
KEYS = {"convergence_config", "seeds", "decide_seeds", "decide_margin", "base_rounds", "rounds", "base", "rules", "attacks",
        "attackers"}
BASE_ID_CHARS = 8
UNRECORDED_BASE = "first"  # records made before bases were recorded: all from the first machine's base
logger = logging.getLogger("robustness")


@dataclass(frozen=True)
class Cell:
    rule: str
    attack: str
    f: int  # attackers per round (0 for no attack)
    seed: int

    @property
    def name(self) -> str:
        return f"{self.rule}/{column_name(self.attack, self.f)}_seed{self.seed}"


def load(path: Path) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    if set(cfg) != KEYS:
        raise ValueError(f"{path}: unknown keys {sorted(set(cfg) - KEYS)}, missing keys {sorted(KEYS - set(cfg))}")
    if set(cfg["seeds"]) & set(cfg["decide_seeds"]):
        raise ValueError(f"{path}: decide_seeds {cfg['decide_seeds']} repeat seeds {cfg['seeds']}")
    for a, spec in cfg["attacks"].items():
        if "data" in spec and (set(spec) != {"data"} or spec["data"] not in ("shuffle", "random")):
            raise ValueError(f"{path}: attack {a}: a poisoned federation is {{data: shuffle|random}} alone")
    return cfg


def columns(cfg: dict) -> list[tuple[str, int]]:
    """(attack, f) of each column: no attack once, every other attack with each f of `attackers`."""
    return [c for a, spec in cfg["attacks"].items() for c in ([(a, 0)] if not spec else [(a, f) for f in cfg["attackers"]])]


def column_name(attack: str, f: int) -> str:
    return attack + (f"_f{f}" if f else "")


def column_rank(cfg: dict, spec: Optional[str]) -> dict[str, int]:
    """The columns to train and their order: `spec` names them ("none,sign_flip_f4,..."), or all, as configured."""
    names = [column_name(a, f) for a, f in columns(cfg)]
    order = spec.split(",") if spec else names
    if len(set(order)) != len(order):
        raise ValueError(f"--columns: {spec} names a column twice")
    if not set(order) <= set(names):
        raise ValueError(f"--columns: unknown columns {sorted(set(order) - set(names))}; the config's are {names}")
    return {c: i for i, c in enumerate(order)}


def cells(cfg: dict, seeds=None) -> list[Cell]:
    """Column by column, every rule of a column before the next: a study cut short leaves whole columns."""
    return [Cell(rule, attack, f, seed) for seed in (cfg["seeds"] if seeds is None else seeds)
            for attack, f in columns(cfg) for rule in cfg["rules"]]


def deciding_cells(cfg: dict, records: dict["Cell", dict]) -> list[Cell]:
    """The cells to run again on `decide_seeds`: in each column, the rules whose mean test WER on
    `seeds` is within `decide_margin` points of the column's best (the best included). A column
    with a rule not yet run decides nothing yet."""
    out = []
    for attack, f in columns(cfg):
        wer = {}
        for rule in cfg["rules"]:
            recs = [records.get(Cell(rule, attack, f, s)) for s in cfg["seeds"]]
            if None in recs:
                break
            wer[rule] = 100 * mean(r["test_wer"] for r in recs)
        else:
            best = min(wer.values())
            out += [Cell(rule, attack, f, s) for s in cfg["decide_seeds"] for rule, w in wer.items()
                    if w <= best + cfg["decide_margin"]]
    return out


class Bench:
    def __init__(self, cfg: dict, study: convergence.Study, out: Path, results: Path) -> None:
        self.cfg, self.study, self.out, self.results = cfg, study, out, results
        self.k = study.cfg["common"]["clients_per_round"]
        self._asr_configs: set[int] = set()
        self._base_ids: dict[int, str] = {}

    def train(self, exp: Path, fl_config: str, listing: Path, seed: int, overrides: dict, asr_config: Path) -> None:
        exp.mkdir(parents=True, exist_ok=True)
        self.study._call(self.study.fl_train_command(asr_config, fl_config, listing, seed, exp,
                                                     [f"{k}={json.dumps(v)}" for k, v in overrides.items()]), exp)

    def common(self) -> dict:
        return {**self.study.cfg["common"], **self.cfg["base"]["overrides"], "keep_checkpoints": 1}

    def base_model(self, seed: int) -> Path:
        """FedAvg on the clean federation for base_rounds: the weights every cell of this seed starts from."""
        exp = self.out / f"base_seed{seed}"
        rows = convergence.metrics(exp) if (exp / "metrics.jsonl").exists() else []
        if not rows or rows[-1]["round"] < self.cfg["base_rounds"]:
            self.train(exp, self.cfg["base"]["fl_config"], self.study.listing(convergence.CLEAN, seed), seed,
                       {**self.common(), "rounds": self.cfg["base_rounds"]}, self.study.recipe / self.study.cfg["asr_config"])
        return exp / "latest.pth"

    def base_id(self, seed: int) -> str:
        """The base model's sha256 prefix, kept in each record: the base trained again on another
        machine came out different (bench/README), so a column compares only on one base. The
        base's own metrics.jsonl is committed under bases/, named by it."""
        if seed not in self._base_ids:
            base = self.base_model(seed)
            self._base_ids[seed] = hashlib.sha256(base.read_bytes()).hexdigest()[:BASE_ID_CHARS]
            (self.results / "bases").mkdir(parents=True, exist_ok=True)
            shutil.copy(base.parent / "metrics.jsonl", self.results / "bases" / f"seed{seed}_{self._base_ids[seed]}.jsonl")
        return self._base_ids[seed]

    def asr_config(self, seed: int) -> Path:
        """The study's ASR config starting from the base model (init_param); written once, before
        the seed's cells run side by side."""
        path = self.out / f"asr_from_base_seed{seed}.yaml"
        if seed not in self._asr_configs:
            conf = yaml.safe_load((self.study.recipe / self.study.cfg["asr_config"]).read_text())
            conf["init_param"] = [str(self.base_model(seed).resolve())]
            path.write_text(yaml.safe_dump(conf))
            self._asr_configs.add(seed)
        return path

    def listing(self, cell: Cell) -> tuple[Path, list[str]]:
        """The cell's client listing, and the clients whose transcripts were poisoned (none for update attacks)."""
        spec = self.cfg["attacks"][cell.attack]
        clean = self.study.listing(convergence.CLEAN, cell.seed)
        if "data" not in spec:
            return clean, []
        from fl_lib.data.clients import load_clients
        from fl_lib.data.corrupt import corrupt_clients

        n = cell.f * len(load_clients(clean)) // self.k
        dest = self.out / f"poison_{spec['data']}{n}_seed{cell.seed}"
        if not (dest / "corrupted.txt").exists():
            corrupt_clients(clean, dest, n, cell.seed, spec["data"])
        return dest / "clients.jsonl", (dest / "corrupted.txt").read_text().split()

    def overrides(self, cell: Cell) -> dict:
        spec = self.cfg["attacks"][cell.attack]
        attack = {} if not spec or "data" in spec else {**spec, "attack.per_round": cell.f}
        # min_clients_per_round = K: a round with a failed client does not count, so every counted round
        # has the K clients that Krum's f and the attackers' honest statistics were planned for
        return {**self.common(), **self.cfg["rules"][cell.rule]["overrides"], **attack, "min_clients_per_round": self.k,
                "rounds": self.cfg["rounds"], "validate_every": self.cfg["rounds"]}

    def run_all(self, todo: list[Cell]) -> dict[Cell, dict]:
        """Train the cells `parallel_jobs` side by side. What two cells share (a seed's corpus, base
        model and ASR config; a poisoned federation) is made first, one at a time."""
        for seed in sorted({c.seed for c in todo}):
            if not self.study.listing(convergence.CLEAN, seed).exists():
                self.study.prepare(seed)
            self.asr_config(seed)
            self.base_id(seed)
        for cell in todo:
            self.listing(cell)
        with ThreadPoolExecutor(self.study.cfg["parallel_jobs"]) as pool:
            return dict(zip(todo, pool.map(self.run, todo)))

    def run(self, cell: Cell) -> dict:
        record = self.results / "runs" / cell.name / "record.json"
        fingerprint = json.loads(json.dumps({"overrides": self.overrides(cell), "fl_config": self.cfg["rules"][cell.rule]["fl_config"],
                                             "base_rounds": self.cfg["base_rounds"], "attack": self.cfg["attacks"][cell.attack]}))
        if record.exists():
            rec = json.loads(record.read_text())
            if rec["fingerprint"] != fingerprint:
                raise ValueError(f"{record} was made with other settings; remove {record.parent} to run it again")
            return rec
        exp = self.out / cell.name
        listing, poisoned = self.listing(cell)
        args = (exp, self.cfg["rules"][cell.rule]["fl_config"], listing, cell.seed, self.overrides(cell), self.asr_config(cell.seed))
        diverged = None
        try:
            self.train(*args)
        except convergence.Diverged:
            # an attack that wins: the cell keeps the last model it counted, and says where it stopped
            rows = convergence.metrics(exp) if (exp / "metrics.jsonl").exists() else []
            if not rows:
                raise RuntimeError(f"{cell.name} diverged in its first round: it has no model of its own to decode") from None
            diverged = rows[-1]["round"] + 1
            logger.warning(f"{cell.name}: the model diverged at round {diverged}; its round {diverged - 1} is decoded")
        else:
            rows = convergence.metrics(exp)
        data = self.study.corpus(cell.seed) / "data"
        # keep_checkpoints 1 keeps the newest round's checkpoint beside the best-dev one: the last counted round decodes
        last = rows[-1]["round"]
        rec = {"cell": cell.__dict__, "fingerprint": fingerprint, "dev_wer": rows[-1]["dev_wer"], "diverged_round": diverged,
               "test_wer": convergence.decode_test(exp, data, [last])[last],
               # CPU-seconds, not wall seconds: cells side by side share the cores, which inflates wall time
               # by whatever else runs; the clients' work is the same for every rule of a column.
               "client_cpu_seconds_per_round": mean(r["client_cpu_seconds"] for r in rows),
               "server_cpu_seconds_per_round": mean(r["server_cpu_seconds"] for r in rows),
               "attacker_weight": attacker_weight(rows, set(poisoned), self.k),
               "base": self.base_id(cell.seed)}
        record.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(exp / "metrics.jsonl", record.parent / "metrics.jsonl")
        record.write_text(json.dumps(rec, sort_keys=True) + "\n")
        logger.info(f"finished {cell.name}: test WER {rec['test_wer']:.3f}")
        return rec


def attacker_weight(rows: list[dict], poisoned: set[str], k: int) -> Optional[float]:
    """The attackers' mean weight when sampled, relative to a uniform 1/K: the update attackers
    logged in `attacked`, or the poisoned clients. None when no attacker was ever aggregated."""
    rel = [w * k for r in rows for c, w in zip(r["clients"], r["weights"]) if c in set(r.get("attacked", [])) | poisoned]
    return sum(rel) / len(rel) if rel else None


def seed_wers(records: dict[Cell, dict], rule: str, attack: str, f: int, seeds) -> list[float]:
    return [100 * r["test_wer"] for c, r in records.items() if (c.rule, c.attack, c.f) == (rule, attack, f) and c.seed in seeds]


def _settings(cfg: dict) -> str:
    """Each rule's own settings, as the table ran them."""
    keep = lambda k: k not in ("strategy.name", "strategy.weight_by")  # noqa: E731
    return "; ".join(f"{rule}: {spec['fl_config']}" + "".join(f", {k.split('.', 1)[1]} {v}" for k, v in spec["overrides"].items() if keep(k))
                     for rule, spec in cfg["rules"].items())


def _legend(cfg: dict, k: int) -> list[str]:
    """What a column's name does not say."""
    from fl_lib.fl.attacks import alie_z

    out = []
    if "alie" in cfg["attacks"]:
        out.append("alie: z_max = " + ", ".join(f"{alie_z(k, f):.2f} at f = {f}" for f in cfg["attackers"] if 2 * f <= k)
                   + f" of K = {k} (0: the attackers send the honest mean itself, which is no attack)")
    if "gaussian" in cfg["attacks"]:
        out.append("gaussian: noise of the honest updates' norm (the issue's definition; weaker than fixed-variance noise)")
    return out


def report(cfg: dict, records: dict[Cell, dict], k: int) -> str:
    """Rows: rules; columns: the attacks with f attackers. The table holds `seeds` only, so that every
    row of a column is read on the same corpora; the decide seeds get their own, paired table."""
    cols, seeds = columns(cfg), cfg["seeds"]

    def cell_text(rule: str, attack: str, f: int) -> str:
        recs = [r for c, r in records.items() if (c.rule, c.attack, c.f) == (rule, attack, f) and c.seed in seeds]
        if not recs:
            return "—"
        wers = [100 * r["test_wer"] for r in recs]
        text = f"{mean(wers):.1f}" + (f" ({min(wers):.1f}–{max(wers):.1f})" if len(wers) > 1 else "")
        weights = [r["attacker_weight"] for r in recs if r["attacker_weight"] is not None]
        diverged = [str(r["diverged_round"]) for r in recs if r.get("diverged_round")]
        return text + (f" w×{mean(weights):.2f}" if weights and f else "") + (f" div@{','.join(diverged)}" if diverged else "")

    head = ["# Attack table (bench/robustness.py)", "",
            f"Test-clean WER % (CTC greedy, acoustic model alone) after {cfg['rounds']} rounds from a FedAvg model of "
            f"{cfg['base_rounds']} rounds, on seeds {seeds} (corpus and training); every cell restarts the client LR schedule, "
            f"the server optimizer and the rule's state. K = {k} clients per round. Update attacks: f of the K clients of "
            "each round; data poisoning: f·N/K of the N clients.", "",
            "- `w×`: the attackers' mean share of the aggregate relative to a uniform 1/K: their weight for fedavg, dga "
            "and rl_dga; for median and trimmed_mean, the share of coordinates at which their value is kept (a forged value "
            "near the centre is kept without pulling); for krum, 1/m when selected; for geometric_median, the last "
            "Weiszfeld weight; for the clipping rules, the clip factor, normalized over the round.",
            *(f"- {line}" for line in _legend(cfg, k)),
            f"- Rules' settings: {_settings(cfg)}.",
            "- Costs, on the clean column: ΔWER against fedavg, paired by seed; the server's CPU-seconds per round (each "
            "result handed to the rule, aggregation, server-optimizer step); a round's CPU-seconds (the column's mean "
            "client CPU-seconds plus the rule's server CPU-seconds) over fedavg's.",
            "- `div@r`: the model diverged at round r (fl_train's exit status 3: `max_failed_rounds` draws in a row "
            "lost their clients only to a non-finite loss, gradient or pseudo-gradient); the WER is that of its round "
            "r − 1, the last it counted, and it ranks as that model.",
            "- `base model`: the sha256 prefix of the checkpoint a column's cells started from; "
            f"`{UNRECORDED_BASE}`: records made before bases were recorded, all from the first machine's base. A base "
            "trained again on another machine comes out different (bench/README), so compare rules within a column; "
            "a `mixed` column does not compare.",
            "", "![the attack table](table.png)", "",
            "|rule|" + "|".join(f"{a}" + (f" f={f}" if f else "") for a, f in cols)
            + "|clean ΔWER vs fedavg|server CPU s/round|round CPU ÷ fedavg|",
            "|---|" + "---|" * (len(cols) + 3)]
    clean = {r: {c.seed: x for c, x in records.items() if (c.rule, c.attack) == (r, "none") and c.seed in seeds} for r in cfg["rules"]}
    timed = [x for by_seed in clean.values() for x in by_seed.values() if "server_cpu_seconds_per_round" in x]
    clients = mean(x["client_cpu_seconds_per_round"] for x in timed) if timed else None
    server = {r: [x["server_cpu_seconds_per_round"] for x in by_seed.values() if "server_cpu_seconds_per_round" in x]
              for r, by_seed in clean.items()}
    for rule in cfg["rules"]:
        paired = [100 * (clean[rule][s]["test_wer"] - clean["fedavg"][s]["test_wer"]) for s in clean[rule] if s in clean.get("fedavg", {})]
        extra = [f"{mean(paired):+.1f}" if paired else "—", f"{mean(server[rule]):.3f}" if server[rule] else "—",
                 f"{(clients + mean(server[rule])) / (clients + mean(server['fedavg'])):.2f}"
                 if server[rule] and server.get("fedavg") else "—"]
        head.append("|" + "|".join([rule, *(cell_text(rule, a, f) for a, f in cols), *extra]) + "|")
    head.append("|" + "|".join(["base model", *(column_base(records, a, f, seeds) for a, f in cols), "", "", ""]) + "|")
    return "\n".join(head + decide_table(cfg, records)) + "\n"


def column_base(records: dict[Cell, dict], attack: str, f: int, seeds) -> str:
    """The base model a column's cells started from, or `mixed: ...` when its rows do not compare."""
    bases = sorted({r.get("base", UNRECORDED_BASE) for c, r in records.items() if (c.attack, c.f) == (attack, f) and c.seed in seeds})
    return bases[0] if len(bases) == 1 else ("mixed: " + ", ".join(bases) if bases else "—")


def decide_table(cfg: dict, records: dict[Cell, dict]) -> list[str]:
    """The cells run again on `decide_seeds`, each against its column's best rule on `seeds` (the one
    the table ranks first), seed by seed: a seed changes the corpus, so only paired differences compare."""
    all_seeds = [*cfg["seeds"], *cfg["decide_seeds"]]
    lines = []
    for attack, f in columns(cfg):
        wer = {rule: seed_wers(records, rule, attack, f, cfg["seeds"]) for rule in cfg["rules"]}
        wer = {rule: mean(w) for rule, w in wer.items() if w}
        decided = sorted({c.rule for c in records if (c.attack, c.f) == (attack, f) and c.seed in cfg["decide_seeds"]},
                         key=lambda r: wer[r])
        if not decided:
            continue
        best = min(wer, key=wer.get)
        by_seed = {(c.rule, c.seed): 100 * r["test_wer"] for c, r in records.items() if (c.attack, c.f) == (attack, f)}
        div = {(c.rule, c.seed): f" div@{r['diverged_round']}" for c, r in records.items()
               if (c.attack, c.f) == (attack, f) and r.get("diverged_round")}
        for rule in decided:
            cells_ = [f"{by_seed[rule, s]:.1f}{div.get((rule, s), '')}" if (rule, s) in by_seed else "—" for s in all_seeds]
            paired = {s: by_seed[rule, s] - by_seed[best, s] for s in all_seeds if (rule, s) in by_seed and (best, s) in by_seed}
            deltas = [f"{paired[s]:+.1f}" if s in paired else "—" for s in all_seeds]
            lines.append("|" + "|".join([column_name(attack, f), rule, *cells_, *deltas, delta_interval(list(paired.values()))]) + "|")
    if not lines:
        return []
    return ["", f"## The cells that decide each column's ranking, again on seeds {cfg['decide_seeds']}", "",
            f"The rules within {cfg['decide_margin']} points of their column's best on seeds {cfg['seeds']}. Δ: the rule's WER "
            "minus that of the column's best rule on the same seed (a seed is its own corpus, so only such paired "
            "differences compare across seeds). Mean Δ: over the seeds with both cells, with its 95 % Student-t interval "
            f"when there are two or more; the best was chosen on seeds {cfg['seeds']}, where every other rule's Δ is "
            "≥ 0 by construction, so the interval leans towards the best.", "",
            "|column|rule|" + "|".join(f"WER seed {s}" for s in all_seeds) + "|" + "|".join(f"Δ seed {s}" for s in all_seeds)
            + "|mean Δ [95 % interval]|",
            "|---|---|" + "---|" * (2 * len(all_seeds) + 1), *lines]


def delta_interval(deltas: list[float]) -> str:
    """`+1.2 [-0.4, +2.8]`: the paired differences' mean and t interval, or the lone difference."""
    if not deltas:
        return "—"
    if len(deltas) == 1:
        return f"{deltas[0]:+.1f}"
    return convergence.interval_text(curves.mean_interval(deltas).__dict__, scale=1, signed=True)


def plot(cfg: dict, records: dict[Cell, dict], png: Path) -> None:
    """The table as a heat map: a row per rule, a column per (attack, f), the WER on `seeds` in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols, rules = columns(cfg), list(cfg["rules"])
    wer = np.full((len(rules), len(cols)), np.nan)
    for i, rule in enumerate(rules):
        for j, (attack, f) in enumerate(cols):
            w = seed_wers(records, rule, attack, f, cfg["seeds"])
            if w:
                wer[i, j] = mean(w)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(cols), 1.2 + 0.45 * len(rules)))
    im = ax.imshow(np.clip(wer, 0, 100), cmap="viridis_r", vmin=0, vmax=100, aspect="auto")
    for (i, j), w in np.ndenumerate(wer):
        if np.isfinite(w):
            ax.text(j, i, f"{w:.0f}", ha="center", va="center", fontsize=7, color="white" if w > 50 else "black")
    ax.set_xticks(range(len(cols)), [a + (f"\nf={f}" if f else "") for a, f in cols], fontsize=7, rotation=90)
    ax.set_yticks(range(len(rules)), rules, fontsize=8)
    fig.colorbar(im, ax=ax, label="test-clean WER %")
    ax.set_title(f"{cfg['rounds']} rounds from FedAvg's {cfg['base_rounds']}: WER under attack (blank: not run)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def study(bench: Bench, rank: dict[str, int], only: set[str], train: bool, decide: bool) -> dict[Cell, dict]:
    """The committed records, and the cells of `only` rules in `rank`'s columns trained in its order:
    the first seeds, then (if `decide`) the decide seeds of the columns they leave within the margin."""
    cfg, records = bench.cfg, {}
    committed = lambda cell: (bench.results / "runs" / cell.name / "record.json").exists()  # noqa: E731
    for phase, train_phase in ((lambda: cells(cfg), train), (lambda: deciding_cells(cfg, records), train and decide)):
        todo = []
        for cell in phase():
            if committed(cell):
                records[cell] = bench.run(cell)  # the committed record, checked against the config
            elif train_phase and cell.rule in only and column_name(cell.attack, cell.f) in rank:
                todo.append(cell)
        todo.sort(key=lambda c: rank[column_name(c.attack, c.f)])  # stable: the rules keep their order
        records.update(bench.run_all(todo))
    return records


def main() -> None:
    p = convergence.study_bench_parser("robustness", __doc__)
    p.add_argument("--only", help="comma-separated rules to train (the report covers every committed record)")
    p.add_argument("--columns", help="comma-separated columns to train, in this order (none, sign_flip_f1, ...); "
                                     "default: every column, in the config's order")
    p.add_argument("--first_seeds_only", action="store_true", help="train no decide-seed cells (a replicate of some columns)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s")
    cfg = load(args.config)
    bench = Bench(cfg, convergence.Study(convergence.load_study(ROOT / cfg["convergence_config"]), args.corpora, args.results),
                  args.out, args.results)
    only = set(args.only.split(",")) if args.only else set(cfg["rules"])
    if not only <= set(cfg["rules"]):
        p.error(f"--only: unknown rules {sorted(only - set(cfg['rules']))}")
    try:
        rank = column_rank(cfg, args.columns)
    except ValueError as e:
        p.error(str(e))
    records = study(bench, rank, only, train=not args.report_only, decide=not args.first_seeds_only)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "report.md").write_text(report(cfg, records, bench.k))
    plot(cfg, records, args.results / "table.png")
    print(json.dumps({"cells": len(records), "first seeds": len(cells(cfg)), "report": str(args.results / "report.md")}))


if __name__ == "__main__":
    main()
