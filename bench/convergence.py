"""Convergence study: do hierarchical optimization and DGA train a federated acoustic model
faster and better than FedAvg and BMUF? The protocol (bench/convergence.yaml):

1. Data: for each seed, the embedded corpus synthesized with `corpus_config` (64 speakers,
   one client each) and that corpus seed, stages 0-4 of egs/librispeech_fl; a second
   federation has `num_corrupted` clients with shuffled transcripts.
2. Tune: every (method, lr) of the grid trains on the clean federation of `tune_seed`,
   a seed that is never reported; each method keeps the lr with the lowest best dev WER.
3. Run: each method at its lr, on both federations, for every seed of `seeds` (corpus and
   training seed together), and the centralized reference on every clean federation.
   A run trains in chunks of `chunk_rounds` until its dev WER curve has flattened
   (curves.flattened) or its cap: `max_rounds` for the tuning grid, `report_max_rounds` for
   the reported runs; the centralized one for `central_epochs` epochs. A cap raised later keeps
   every record that flattened below it and trains on the ones that stopped at the old cap.
4. Score: every validated checkpoint is decoded (CTC greedy) on test-clean. A run's
   plateau WER is the test WER at its best dev round. Targets, fixed here before any run:
   `target_factor` x the centralized plateau dev WER of the same seed, and the baseline's
   own plateau test WER (the paper's "rounds to FedAvg's final WER"). Intervals are
   Student-t over seeds; differences and speed-ups are paired by seed.
5. Rules: the study counts only when every seed finished and every FedAvg run flattened;
   otherwise the report says it does not count and the exit status is 1.

Each finished run leaves a compact record (config, metrics.jsonl, dev and test curves,
no checkpoints) under bench/results/convergence/; a rerun, here or on another machine
after a git pull, reuses those records and trains only what is missing.

A session that must stop mid-run parks its unfinished runs (`--park`, after stopping the
study): each one's metrics, the test WERs of its validated rounds and its last checkpoint.pth
go to bench/results/convergence/parked/, to be committed; the next session, at the same path,
resumes each parked run from its round instead of from round 0.

    bench/convergence.sh [--report_only] [--jobs_only tune|report] [--park]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import curves  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("convergence")
CLEAN = "clean"
CHECKPOINT = "checkpoint.pth"  # fl_train's resumable state (fl_lib/fl/server.py)
TEST_CACHE = "test_wer.json"  # {round: test-clean WER} decoded so far
PARKED = "parked.json"  # a parked run's round, run directory and fingerprint
STUDY_KEYS = {
    "recipe_dir", "corpus_config", "asr_config", "centralized_config", "tune_seed", "seeds", "num_corrupted",
    "parallel_jobs", "chunk_rounds", "max_rounds", "report_max_rounds", "central_epochs", "flatten", "target_factor", "baselines",
    "common", "methods",
}


def load_study(path: Path) -> dict:
    """The study config; unknown or missing keys are an error."""
    cfg = yaml.safe_load(Path(path).read_text())
    if set(cfg) != STUDY_KEYS:
        raise ValueError(f"{path}: unknown keys {sorted(set(cfg) - STUDY_KEYS)}, missing keys {sorted(STUDY_KEYS - set(cfg))}")
    if cfg["tune_seed"] in cfg["seeds"]:
        raise ValueError(f"{path}: tune_seed {cfg['tune_seed']} is also a reported seed")
    if "fedavg" not in cfg["methods"] or not set(cfg["baselines"]) <= set(cfg["methods"]):
        raise ValueError(f"{path}: methods must include fedavg and the baselines {cfg['baselines']}")
    for m, spec in cfg["methods"].items():
        labels = [setting_label(g) for g in spec["grid"]]
        if len(set(labels)) != len(labels):
            raise ValueError(f"{path}: method {m}'s grid points share a directory label: {labels}")
    every = cfg["common"]["validate_every"]
    if cfg["chunk_rounds"] % every or cfg["max_rounds"] % cfg["chunk_rounds"] or cfg["report_max_rounds"] % cfg["chunk_rounds"]:
        raise ValueError(f"{path}: chunk_rounds must be a multiple of validate_every and divide max_rounds and report_max_rounds")
    if cfg["report_max_rounds"] < cfg["max_rounds"]:
        raise ValueError(f"{path}: report_max_rounds must be at least max_rounds")
    return cfg


def setting_label(setting: dict) -> str:
    """A grid point's directory-name label, from its values: 'lr0.01_betas0.0-0.99'; a key's last
    part names it, its full path where two keys end alike ('server_optim.lr0.01_client.lr0.004')."""
    def value(v):
        return "-".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)
    last = [k.split(".")[-1] for k in setting]
    return "_".join(f"{k if last.count(k.split('.')[-1]) > 1 else k.split('.')[-1]}{value(v)}" for k, v in setting.items())


@dataclass(frozen=True)
class Run:
    """One training run of the study; `method` is 'central' for the centralized reference.

    `setting` is the method's grid point (JSON of its key=value overrides)."""

    fed: str
    method: str
    setting: Optional[str]
    seed: int

    @property
    def overrides(self) -> dict:
        return json.loads(self.setting)

    @property
    def name(self) -> str:
        if self.method == "central":
            return f"central/seed{self.seed}"
        return f"{self.fed}/{self.method}_{setting_label(self.overrides)}_seed{self.seed}"


class Diverged(RuntimeError):
    """fl_train's model diverged (its exit status EXIT_DIVERGED): a result for a study that attacks
    it (bench/robustness.py), a failure for one that does not."""


class Study:
    def __init__(self, cfg: dict, out: Path, results: Path) -> None:
        self.cfg, self.out, self.results = cfg, out, results
        self.recipe = ROOT / cfg["recipe_dir"]
        self.bad = f"corrupt{cfg['num_corrupted']}"

    # -- data ----------------------------------------------------------------
    def corpus(self, seed: int) -> Path:
        return self.out / f"corpus_s{seed}"

    def prepare(self, seed: int) -> None:
        """Stages 0-4 of the recipe for this corpus seed (its done-markers make a rerun instant)."""
        root = self.corpus(seed)
        cmd = ["./run.sh", "--stage", "0", "--stop_stage", "4", "--corpus_config", self.cfg["corpus_config"],
               "--seed", str(seed), "--use_lm", "false", "--data", str(root / "data"), "--exp", str(root / "exp")]
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "prepare.log", "a") as log:
            if subprocess.run(cmd, cwd=self.recipe, stdout=log, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"data preparation for seed {seed} failed; see {root / 'prepare.log'}")
        clean = root / "data/clients/train-clean-100/clients.jsonl"
        if not (root / self.bad / "clients.jsonl").exists():
            from fl_lib.data.corrupt import corrupt_clients

            corrupt_clients(clean, root / self.bad, self.cfg["num_corrupted"], seed)

    def listing(self, fed: str, seed: int) -> Path:
        root = self.corpus(seed)
        return root / "data/clients/train-clean-100/clients.jsonl" if fed == CLEAN else root / fed / "clients.jsonl"

    def corrupted(self, seed: int) -> set[str]:
        return set((self.corpus(seed) / self.bad / "corrupted.txt").read_text().split())

    # -- commands ------------------------------------------------------------
    def data_args(self, seed: int) -> list[str]:
        data, exp = self.corpus(seed) / "data", self.corpus(seed) / "exp"
        return ["--dev_cuts", str(data / "sets/dev-clean.jsonl.gz"), "--token_list", str(data / "token_list/char/tokens.txt"),
                "--bpemodel", str(data / "token_list/char/bpe.model"), "--feats_stats", str(exp / "asr_stats/feats_stats.npz")]

    def fl_command(self, run: Run, rounds: int) -> list[str]:
        method = self.cfg["methods"][run.method]
        return self.fl_train_command(self.recipe / self.cfg["asr_config"], method["fl_config"], self.listing(run.fed, run.seed),
                                     run.seed, self.out / run.name, [*fl_overrides(self.cfg, method, run.overrides), f"rounds={rounds}"])

    def fl_train_command(self, asr_config: Path, fl_config: str, listing: Path, seed: int, out: Path,
                         overrides: list[str]) -> list[str]:
        """fl_train on this study's data for `seed`: one client process (runs go side by side, one core each)."""
        return [
            sys.executable, "-m", "fl_lib.bin.fl_train", "--asr_config", str(asr_config),
            "--fl_config", str(self.recipe / fl_config), "--train_clients", str(listing), *self.data_args(seed),
            "--client_jobs", "1", "--seed", str(seed), "--output_dir", str(out), *overrides,
        ]

    def central_command(self, run: Run) -> list[str]:
        epochs = self.cfg["central_epochs"]
        return [
            sys.executable, "-m", "fl_lib.bin.train_centralized",
            "--asr_config", str(self.recipe / self.cfg["asr_config"]),
            "--config", str(self.recipe / self.cfg["centralized_config"]),
            "--train_clients", str(self.listing(CLEAN, run.seed)), *self.data_args(run.seed),
            "--num_threads", "1", "--seed", str(run.seed), "--output_dir", str(self.out / run.name),
            f"max_epoch={epochs}", f"keep_checkpoints={epochs}",
        ]

    # -- running -------------------------------------------------------------
    def record_dir(self, run: Run) -> Path:
        return self.results / "runs" / run.name

    def cap(self, run: Run) -> int:
        """The rounds after which `run` stops, flattened or not."""
        return self.cfg["max_rounds"] if run.seed == self.cfg["tune_seed"] else self.cfg["report_max_rounds"]

    def fingerprint(self, run: Run) -> dict:
        """Everything that decides what a run trains and when it stops (configs by content, not
        by text: comments may change). keep_checkpoints and rounds are left out: they do not."""
        read = lambda rel: yaml.safe_load((self.recipe / rel).read_text())  # noqa: E731
        common = {"asr_config": read(self.cfg["asr_config"]), "corpus_config": read(self.cfg["corpus_config"]),
                  "flatten": self.cfg["flatten"]}
        if run.method == "central":
            return {**common, "centralized_config": read(self.cfg["centralized_config"]), "epochs": self.cfg["central_epochs"]}
        method = self.cfg["methods"][run.method]
        overrides = [o for o in fl_overrides(self.cfg, method, run.overrides) if not o.startswith("keep_checkpoints=")]
        return {**common, "fl_config": read(method["fl_config"]), "overrides": overrides,
                "max_rounds": self.cap(run), "chunk_rounds": self.cfg["chunk_rounds"],
                "num_corrupted": self.cfg["num_corrupted"]}

    def record(self, run: Run) -> Optional[dict]:
        """The committed record of `run`, None if there is none; an error if it was made with other settings."""
        path = self.record_dir(run) / "record.json"
        if not path.exists():
            return None
        rec = json.loads(path.read_text())
        now = json.loads(json.dumps(self.fingerprint(run)))
        differ = fingerprint_differences(rec.get("fingerprint", {}), now)
        if differ == ["max_rounds"]:  # the cap was changed after the record was made
            if rec["status"] == "flattened" and rec["last"] <= now["max_rounds"]:
                return rec  # it stopped when it flattened, under the old cap: the same run under the new one
            if rec["status"] != "flattened" and rec["last"] < now["max_rounds"]:
                logger.warning(f"{run.name} reached its cap of {rec['last']} rounds without flattening: "
                               f"it trains on to the new cap of {now['max_rounds']} (from round 0 unless its run directory is here)")
                return None
        if differ:
            raise ValueError(f"{path} was made with other settings ({', '.join(differ)} differ); "
                             f"remove {path.parent} to train that run again")
        return rec

    def execute(self, run: Run) -> dict:
        """Train `run` until it flattens (or its cap), decode its test curve, commit its record."""
        done = self.record(run)
        if done is not None:
            return done
        out = self.out / run.name
        out.mkdir(parents=True, exist_ok=True)
        self.unpark(run)
        if not (out / "metrics.jsonl").exists():  # a run (re)starting from round 0: earlier test WERs are not its own
            (out / TEST_CACHE).unlink(missing_ok=True)
        t0 = time.time()
        if run.method == "central":
            if not (out / "metrics.jsonl").exists() or len(metrics(out)) < self.cfg["central_epochs"]:
                self._call(self.central_command(run), out)  # it does not resume: a killed one starts over
        else:
            flat = self.cfg["flatten"]
            while True:
                rows = metrics(out) if (out / "metrics.jsonl").exists() else []
                rounds = rows[-1]["round"] if rows else 0
                if rounds >= self.cap(run) or curves.flattened(dev_curve(rows), **flat):
                    break
                # up to the next multiple of chunk_rounds: a run killed mid-chunk gets back in step
                chunk = self.cfg["chunk_rounds"]
                self._call(self.fl_command(run, (rounds // chunk + 1) * chunk), out)
                if metrics(out)[-1]["round"] <= rounds:
                    raise RuntimeError(f"{out}: fl_train exited 0 without training a round; see {out / 'bench.log'}")
        rec = self._write_record(run, out)
        logger.info(f"finished {run.name} ({rec['status']}, {rec['last']} {rec['unit']}) in {time.time() - t0:.0f}s")
        return rec

    @staticmethod
    def _call(cmd: list[str], out: Path) -> None:
        from fl_lib.bin.fl_train import EXIT_DIVERGED

        with open(out / "bench.log", "a") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc == EXIT_DIVERGED:
            raise Diverged(f"{out}: the model diverged; see {out / 'bench.log'}")
        if rc != 0:
            raise RuntimeError(f"{out}: {cmd[2]} exited {rc}; see {out / 'bench.log'}")

    def _write_record(self, run: Run, out: Path) -> dict:
        rows = metrics(out)
        central = run.method == "central"
        key = "epoch" if central else "round"
        dev = dev_curve(rows)
        steps = cumulative_steps(rows)
        test = self.test_curve(run, out, dev)
        flat = curves.flattened(dev, **self.cfg["flatten"])
        rec = {
            "run": run.__dict__, "fingerprint": self.fingerprint(run), "unit": key, "last": rows[-1][key], "status": "flattened" if flat else "not flattened",
            "dev": dev, "test": {k: test[k] for k in dev}, "steps": {k: steps[k] for k in dev},
            # training time, validation not included; the centralized rows carry it cumulatively
            "minutes": round((rows[-1]["train_seconds"] if central else sum(r["train_seconds"] for r in rows)) / 60, 2),
        }
        # the learning rates the run ended with: a curve can flatten because its schedule decayed
        rec["lr_end"] = {"lr": rows[-1]["lr"]} if central else {"client": rows[-1]["client_lr"], "server": rows[-1]["lr"]}
        if run.fed != CLEAN:
            rec["corrupted"] = sorted(self.corrupted(run.seed))
        if not central:
            rec["weights"] = {"clients": [r["clients"] for r in rows], "weights": [r["weights"] for r in rows],
                              "agent": [r.get("strategy", {}).get("agent_weights") for r in rows]}
        dest = self.record_dir(run)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "fl_config.yaml", "centralized_config.yaml"):
            if (out / name).exists():
                shutil.copy(out / name, dest / name)
        from fl_lib.atomic import atomic_path

        with atomic_path(dest / "record.json") as tmp:  # the record is the run's "done" marker: written last, atomically
            tmp.write_text(json.dumps(rec, indent=None, sort_keys=True) + "\n")
        shutil.rmtree(self.parked_dir(run), ignore_errors=True)  # the record supersedes it
        return rec

    def test_curve(self, run: Run, out: Path, dev: dict[int, float]) -> dict[int, float]:
        """{validated round or epoch: test-clean WER}: the ones decoded before (TEST_CACHE, which
        a parked run brings along) and the kept checkpoints of the others, decoded now."""
        cache = out / TEST_CACHE
        known = by_key(json.loads(cache.read_text())) if cache.exists() else {}
        todo = [k for k in dev if k not in known]
        test = {**known, **(decode_test(out, self.corpus(run.seed) / "data", todo) if todo else {})}
        missing = sorted(set(dev) - set(test))
        if missing:
            raise RuntimeError(f"{out}: no checkpoint kept for validated rounds or epochs {missing[:5]}...; "
                               "keep_checkpoints is too small")
        cache.write_text(json.dumps({k: test[k] for k in dev}) + "\n")
        return {k: test[k] for k in dev}

    # -- parking: an unfinished run carried over to the next session -----------
    def parked_dir(self, run: Run) -> Path:
        return self.results / "parked" / run.name

    def park(self, run: Run) -> bool:
        """Keep what `run` needs to go on from its last round under results/parked/: checkpoint.pth,
        metrics.jsonl up to that round and the test WERs of its validated rounds (its <N>round.pth
        files stay behind). False when there is nothing to park: no run directory, a finished
        run, or the centralized reference (ESPnet's Trainer run here does not resume)."""
        out = self.out / run.name
        if run.method == "central" or self.record(run) is not None or not (out / CHECKPOINT).exists():
            return False
        from fl_lib.fl.checkpoint import load_resumable

        state, path = load_resumable(out / CHECKPOINT)
        rows = [r for r in metrics(out) if r["round"] <= state["round"]]
        test = self.test_curve(run, out, dev_curve(rows))
        dest = self.parked_dir(run)
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        shutil.copy(path, dest / CHECKPOINT)
        (dest / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (dest / TEST_CACHE).write_text(json.dumps(test) + "\n")
        (dest / PARKED).write_text(json.dumps({"round": state["round"], "out": str(out), "fingerprint": self.fingerprint(run)}) + "\n")
        logger.info(f"parked {run.name} at round {state['round']} in {dest}")
        return True

    def unpark(self, run: Run) -> None:
        """Start a parked run from its parked round: into a run directory with no metrics yet.

        Its checkpoint holds absolute paths (the ESPnet config's token list and feature
        statistics), which fl_train's resume check compares: a run parked under another
        --out starts over, with a warning. A parked run made with other settings is an error."""
        src, out = self.parked_dir(run), self.out / run.name
        if not (src / PARKED).exists() or (out / "metrics.jsonl").exists():
            return
        info = json.loads((src / PARKED).read_text())
        now = json.loads(json.dumps(self.fingerprint(run)))
        differ = fingerprint_differences(info["fingerprint"], now)
        if differ and not (differ == ["max_rounds"] and info["round"] < now["max_rounds"]):  # a raised cap: it goes on
            raise ValueError(f"{src} was parked with other settings ({', '.join(differ)} differ); "
                             "remove it to train that run from round 0")
        if info["out"] != str(out):
            logger.warning(f"{src} was parked from {info['out']}, not {out}: its checkpoint names that path, "
                           f"so {run.name} starts over from round 0")
            return
        for name in (CHECKPOINT, "metrics.jsonl", TEST_CACHE):
            shutil.copy(src / name, out / name)
        logger.info(f"{run.name}: resumes from round {info['round']}, parked in {src}")

    def run_all(self, runs: list[Run]) -> dict[Run, dict]:
        with ThreadPoolExecutor(self.cfg["parallel_jobs"]) as pool:
            return dict(zip(runs, pool.map(self.execute, runs)))


def fingerprint_differences(old: dict, new: dict) -> list[str]:
    """The keys on which two run fingerprints differ."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def fl_overrides(cfg: dict, method: dict, setting: dict) -> list[str]:
    """fl_train's key=value overrides for one run: `common`, then the method's `overrides`, then its grid point.

    keep_checkpoints keeps every validated round, whose test WER is read afterwards: every
    validate_every-th round, and the last round of each fl_train call (fl_train validates it), up to
    the larger cap."""
    cap = max(cfg["max_rounds"], cfg["report_max_rounds"])
    keep = cap // cfg["common"]["validate_every"] + cap // cfg["chunk_rounds"]
    settings = {**cfg["common"], "keep_checkpoints": keep, **method.get("overrides", {}), **setting}
    return [f"{k}={json.dumps(v)}" for k, v in settings.items()]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def dev_curve(rows: list[dict]) -> dict[int, float]:
    """{round or epoch: dev WER} of the validated rows."""
    return {r.get("round", r.get("epoch")): r["dev_wer"] for r in rows if r.get("dev_wer") is not None}


def cumulative_steps(rows: list[dict]) -> dict[int, int]:
    """{round or epoch: optimizer steps so far}: client steps summed (federated), or batches (centralized)."""
    if rows and "epoch" in rows[0]:
        return {r["epoch"]: r["steps"] for r in rows}
    total, out = 0, {}
    for r in rows:
        total += r["client_steps"]
        out[r["round"]] = total
    return out


def decode_test(exp: Path, data: Path, rounds: list[int]) -> dict[int, float]:
    """{round or epoch: CTC-greedy test-clean WER} of the kept checkpoints of these (validated) rounds."""
    from fl_lib.asr.average import round_checkpoints
    from fl_lib.data.dataset import make_dataloader
    from fl_lib.data.tokenizer import Tokenizer
    from fl_lib.espnet_env import asr_task
    from fl_lib.fl.validation import evaluate

    tok = Tokenizer(data / "token_list/char/bpe.model", data / "token_list/char/tokens.txt")
    out = {}
    for rnd, path in round_checkpoints(exp).items():
        if rnd not in rounds:
            continue
        model, _ = asr_task().build_model_from_file(exp / "config.yaml", path, "cpu")
        out[rnd] = evaluate(model, make_dataloader(data / "sets/test-clean.jsonl.gz", tok, max_duration=120.0), tok)["wer"]
    return out


# -- the report ---------------------------------------------------------------
def by_key(curve: dict) -> dict[int, float]:
    """JSON turns int keys into strings: back to ints, ascending."""
    return {int(k): v for k, v in sorted(curve.items(), key=lambda kv: int(kv[0]))}


def plateau(rec: dict) -> tuple[int, float]:
    """(round, test WER) at the best dev WER of a record."""
    x = curves.plateau_point(by_key(rec["dev"]))
    return x, by_key(rec["test"])[x]


def reach(rec: dict, target: float) -> tuple[Optional[float], Optional[float]]:
    """(round or epoch, steps) at which the record's test curve first reaches `target`, interpolated."""
    x = curves.first_reach(by_key(rec["test"]), target)
    return (None, None) if x is None else (x, curves.at(by_key(rec["steps"]), x))


def relative_weight(rec: dict, bad: set[str], agent: bool = False) -> Optional[float]:
    """Mean aggregation weight of the corrupted clients when sampled, relative to a uniform 1/K."""
    w = rec["weights"]
    if agent:
        rel = [v * len(c) for c, a in zip(w["clients"], w["agent"]) if a for cid, v in a.items() if cid in bad]
    else:
        rel = [v * len(c) for c, ws in zip(w["clients"], w["weights"]) for cid, v in zip(c, ws) if cid in bad]
    return sum(rel) / len(rel) if rel else None


def summarize(cfg: dict, fed: str, records: dict[str, dict[int, dict]], central: dict[int, dict],
              bad: dict[int, set[str]]) -> dict:
    """records: method -> seed -> record; central: seed -> centralized record."""
    level = 0.95
    seeds = cfg["seeds"]
    central_dev = {s: min(by_key(central[s]["dev"]).values()) for s in seeds}
    target = {s: cfg["target_factor"] * central_dev[s] for s in seeds}
    out = {"federation": fed, "targets": target, "central_plateau_dev": central_dev, "methods": {},
           "central": {"plateau_test_wer": curves.mean_interval([plateau(central[s])[1] for s in seeds], level).__dict__,
                       "flattened": {s: central[s]["status"] == "flattened" for s in seeds},
                       "target_steps": {s: reach(central[s], target[s])[1] for s in seeds}}}
    central_by_steps = {s: {by_key(central[s]["steps"])[e]: w for e, w in by_key(central[s]["dev"]).items()} for s in seeds}
    points = {m: {s: plateau(per_seed[s]) for s in seeds} for m, per_seed in records.items()}  # (round, test WER)
    for m, per_seed in records.items():
        plat = {s: points[m][s][1] for s in seeds}
        ratio = {}  # plateau dev WER over the centralized run's best dev WER within the same optimizer steps
        for s in seeds:
            x = points[m][s][0]
            central_best = curves.best_so_far(central_by_steps[s], by_key(per_seed[s]["steps"])[x])
            ratio[s] = by_key(per_seed[s]["dev"])[x] / central_best if math.isfinite(central_best) else None
        hits = {s: reach(per_seed[s], target[s]) for s in seeds}
        row = {
            "plateau_test_wer": curves.mean_interval([plat[s] for s in seeds], level).__dict__,
            "plateau_test_wers": plat,
            "flattened": {s: per_seed[s]["status"] == "flattened" for s in seeds},
            "rounds": {s: per_seed[s]["last"] for s in seeds},
            "target_rounds": {s: hits[s][0] for s in seeds},
            "target_steps": {s: hits[s][1] for s in seeds},
            "dev_over_central_same_steps": ratio,
        }
        if None not in ratio.values():
            row["dev_over_central_interval"] = curves.mean_interval(list(ratio.values()), level).__dict__
        reached = [s for s in seeds if hits[s][0] is not None]
        if len(reached) == len(seeds):
            row["target_rounds_interval"] = curves.mean_interval([hits[s][0] for s in seeds], level).__dict__
            row["target_steps_interval"] = curves.mean_interval([hits[s][1] for s in seeds], level).__dict__
        for base in cfg["baselines"]:
            base_wer = {s: points[base][s][1] for s in seeds}
            diff = curves.mean_interval([plat[s] - base_wer[s] for s in seeds], level)
            base_mean = sum(base_wer.values()) / len(seeds)
            row[f"vs_{base}"] = {"wer_difference": diff.__dict__, "significant": diff.excludes(0.0), "werr": -diff.mean / base_mean}
            ratios = []
            for s in seeds:  # rounds the baseline needs to its own plateau test WER, over the method's
                r_base, r_m = reach(records[base][s], base_wer[s])[0], reach(per_seed[s], base_wer[s])[0]
                ratios.append(None if r_m is None else r_base / r_m)
            row[f"vs_{base}"]["speedups"] = dict(zip(seeds, ratios))
            if all(r is not None for r in ratios):
                sp = curves.ratio_interval(ratios, level)
                row[f"vs_{base}"]["speedup"] = sp.__dict__
                row[f"vs_{base}"]["speedup_significant"] = sp.excludes(1.0)
        if fed != CLEAN:
            rel = [relative_weight(per_seed[s], bad[s]) for s in seeds]
            agent = [relative_weight(per_seed[s], bad[s], agent=True) for s in seeds]
            row["corrupted_rel_weight"] = None if None in rel else sum(rel) / len(rel)
            row["corrupted_agent_rel_weight"] = None if None in agent else sum(agent) / len(agent)
        out["methods"][m] = row
    return out


def verdict(cfg: dict, records: dict[str, dict[str, dict[int, dict]]]) -> list[str]:
    """Why the study does not count (empty: it counts): missing seeds, or a FedAvg run that did not flatten."""
    problems = []
    for fed, by_method in records.items():
        for m, per_seed in by_method.items():
            missing = [s for s in cfg["seeds"] if s not in per_seed]
            if missing:
                problems.append(f"{fed}/{m}: seeds {missing} have not finished ({len(per_seed)} of {len(cfg['seeds'])})")
        for s, rec in by_method.get("fedavg", {}).items():
            if rec["status"] != "flattened":
                problems.append(f"{fed}/fedavg seed {s} has not flattened after {rec['last']} rounds")
    return problems


def pct(x: Optional[float]) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def interval_text(iv: Optional[dict], scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """'mean [low, high]' of an Interval's dict; `signed` writes '+' on differences that are not negative."""
    if iv is None:
        return "n/a"
    sign = "+" if signed else ""
    f = lambda v: "±inf" if not math.isfinite(v) else f"{scale * v:{sign}.{digits}f}"  # noqa: E731
    return f"{f(iv['mean'])} [{f(iv['low'])}, {f(iv['high'])}]"


def markdown(cfg: dict, summaries: list[dict], problems: list[str], settings: dict, grid_dev: dict, cost: dict,
             done: dict[str, dict]) -> str:
    n = len(cfg["seeds"])
    head = ["# Convergence study", ""]
    if problems:
        head += ["**This study does not count:**", "", *[f"- {p}" for p in problems], ""]
    head += [f"Seeds (corpus and training) {cfg['seeds']}; learning rates chosen on dev with seed {cfg['tune_seed']}, "
             f"which is not reported. Intervals: 95 % Student-t over the {n} seeds; differences and speed-ups are "
             "paired by seed, and called significant when the interval excludes 0 (or 1). Rounds and steps to a target "
             "are interpolated linearly between validations.", ""]
    for s in summaries:
        targets = ", ".join(f"{pct(t)} %" for t in s["targets"].values())
        head += [
            f"## Federation: {s['federation']}", "",
            f"Target A = {cfg['target_factor']} x the centralized plateau dev WER of each seed ({targets}), read on test-clean.",
            "Speed-up = rounds the baseline needs to reach its own plateau test WER, over the rounds the method needs to reach it.", "",
            "|method|setting (chosen on dev)|plateau test WER % [95 % CI]|flattened|rounds run|rounds to A|client steps to A (k)|"
            "dev WER ÷ centralized at equal steps [CI]|"
            + "|".join(f"Δ WER vs {b} (pts) [CI]|WERR vs {b} %|speed-up vs {b} [CI]" for b in cfg["baselines"])
            + ("|corrupted clients' weight ×uniform|" if s["federation"] != CLEAN else "|"),
            "|" + "---|" * (7 + 3 * len(cfg["baselines"]) + (2 if s["federation"] != CLEAN else 1)),
        ]
        for m, v in s["methods"].items():
            cells = [m, str(settings[m]), interval_text(v["plateau_test_wer"]),
                     f"{sum(v['flattened'].values())}/{n}", "/".join(str(r) for r in v["rounds"].values()),
                     interval_text(v.get("target_rounds_interval"), 1, 0) if "target_rounds_interval" in v
                     else "/".join("—" if r is None else f"{r:.0f}" for r in v["target_rounds"].values()),
                     interval_text(v.get("target_steps_interval"), 1e-3, 1) if "target_steps_interval" in v else "n/a",
                     interval_text(v.get("dev_over_central_interval"), 1, 2)]
            for b in cfg["baselines"]:
                c = v[f"vs_{b}"]
                sig = " *" if c["significant"] else ""
                cells += [interval_text(c["wer_difference"]) + sig, pct(c["werr"]),
                          (interval_text(c["speedup"], 1, 2) + (" *" if c["speedup_significant"] else "")) if "speedup" in c
                          else "/".join("—" if r is None else f"{r:.2f}" for r in c["speedups"].values())]
            if s["federation"] != CLEAN:
                weight = "n/a" if v["corrupted_rel_weight"] is None else f"{v['corrupted_rel_weight']:.2f}"
                cells.append(weight + (f" (agent {v['corrupted_agent_rel_weight']:.2f})"
                                       if v["corrupted_agent_rel_weight"] is not None else ""))
            head.append("|" + "|".join(cells) + "|")
        c = s["central"]
        head += ["", "`*`: significant at 95 %. `—`: not reached within the run.", "",
                 f"Centralized reference (clean data pooled, same model and batch size, {cfg['central_epochs']} epochs): "
                 f"plateau test WER {interval_text(c['plateau_test_wer'])} %, flattened {sum(c['flattened'].values())}/{n}, "
                 "steps to A " + "/".join("—" if v is None else str(v) for v in c["target_steps"].values()) + ".", ""]
    head += ["## Tuning grid: best dev WER on the clean federation of the tuning seed", "", "```",
             json.dumps(grid_dev, indent=1), "```", "",
             f"## Cost\n\n{cost['runs']} runs, {cost['run_minutes']} minutes of training in all (validation and test decoding not "
             f"included), about {cost['wall_minutes']} minutes with {cfg['parallel_jobs']} runs side by side.", "",
             "![dev WER against client compute](convergence.png)", "",
             "![the tuning grid's dev WER against client compute](tuning.png)", "",
             "## Every finished run", "",
             "|run|status|rounds (epochs)|best dev WER %|its test WER %|training minutes|learning rates at the end|",
             "|---|---|---|---|---|---|---|"]
    for name, rec in sorted(done.items()):
        x, test = plateau(rec)
        lrs = ", ".join(f"{k} {v:.2g}" for k, v in rec.get("lr_end", {}).items()) or "n/a"
        head.append(f"|{name}|{rec['status']}|{rec['last']}|{pct(by_key(rec['dev'])[x])} (at {x})|{pct(test)}|{rec['minutes']}|{lrs}|")
    return "\n".join(head) + "\n"


def plot(cfg: dict, records: dict, central: dict, png: Path) -> None:
    """Seed-mean dev WER against cumulative client steps, per method and federation, with the centralized reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feds = list(records)
    fig, axes = plt.subplots(1, len(feds), figsize=(7 * len(feds), 5), squeeze=False)

    def mean_xy(recs: list[dict]):
        common = sorted(set.intersection(*(set(by_key(r["dev"])) for r in recs)))
        xs = [sum(by_key(r["steps"])[k] for r in recs) / len(recs) / 1000 for k in common]
        ys = [100 * sum(by_key(r["dev"])[k] for r in recs) / len(recs) for k in common]
        return xs, ys

    for ax, fed in zip(axes[0], feds):
        for m, per_seed in records[fed].items():
            if per_seed:
                ax.plot(*mean_xy(list(per_seed.values())), marker="o", ms=2, label=m)
        if central:
            ax.plot(*mean_xy(list(central.values())), "k--", marker="s", ms=3, label="centralized")
        ax.set(title=f"federation: {fed}", xlabel="client compute: optimizer steps of 10 s batches (thousands)",
               ylabel="dev-clean WER % (CTC greedy, seed mean)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_grid(grid_records: dict[str, dict[str, dict]], png: Path) -> None:
    """The tuning grid: each point's dev WER against client steps, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grid_records), figsize=(4.5 * len(grid_records), 4), squeeze=False, sharey=True)
    for ax, (m, by_setting) in zip(axes[0], grid_records.items()):
        for label, rec in by_setting.items():
            dev, steps = by_key(rec["dev"]), by_key(rec["steps"])
            ax.plot([steps[k] / 1000 for k in dev], [100 * w for w in dev.values()], marker="o", ms=2,
                    label=f"{label} ({rec['status']})")
        ax.set(title=m, xlabel="client steps (thousands)", ylim=(0, 105))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("dev-clean WER % (CTC greedy), tuning seed")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def study_bench_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The options of a bench that trains on this study's corpora (bench/privacy.py, bench/robustness.py)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / f"bench/{name}.yaml")
    p.add_argument("--corpora", type=Path, default=ROOT / "bench/out/convergence", help="the convergence study's corpora (made if missing)")
    p.add_argument("--out", type=Path, default=ROOT / f"bench/out/{name}", help="run directories (not committed)")
    p.add_argument("--results", type=Path, default=ROOT / f"bench/results/{name}", help="compact records and the report (committed)")
    p.add_argument("--report_only", action="store_true", help="report on the committed records, train nothing")
    return p


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "bench/convergence.yaml")
    p.add_argument("--out", type=Path, default=ROOT / "bench/out/convergence", help="run directories (checkpoints; not committed)")
    p.add_argument("--results", type=Path, default=ROOT / "bench/results/convergence", help="compact records and the report (committed)")
    p.add_argument("--report_only", action="store_true", help="report on the committed records, train nothing")
    p.add_argument("--jobs_only", choices=("tune", "report"), help="train only this phase, then report")
    p.add_argument("--park", action="store_true",
                   help="after the study was stopped: keep every unfinished run's state under <results>/parked/ to commit")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s")
    cfg = load_study(args.config)
    study = Study(cfg, args.out, args.results)
    methods, seeds, tune = cfg["methods"], cfg["seeds"], cfg["tune_seed"]
    feds = [CLEAN, study.bad]
    t0 = time.time()

    grid = [Run(CLEAN, m, json.dumps(g, sort_keys=True), tune) for m, spec in methods.items() for g in spec["grid"]]
    if not args.report_only and args.jobs_only != "report":
        study.prepare(tune)
        study.run_all(grid)
    grid_dev = {m: {} for m in methods}  # best dev WER of each grid point
    for r in grid:
        rec = study.record(r)
        grid_dev[r.method][r.setting] = None if rec is None else min(by_key(rec["dev"]).values())
    chosen = {m: min((g for g in by_g if by_g[g] is not None), key=by_g.get, default=None) for m, by_g in grid_dev.items()}
    settings = {m: g and json.loads(g) for m, g in chosen.items()}
    report_runs = [Run(fed, m, chosen[m], s) for s in seeds for fed in feds for m in methods if chosen[m] is not None]
    central_runs = [Run(CLEAN, "central", None, s) for s in seeds]
    if args.park:
        parked = [r.name for r in [*grid, *report_runs] if study.park(r)]
        print(json.dumps({"parked": parked}))
        return
    if not args.report_only and args.jobs_only != "tune":
        if None in settings.values():
            sys.exit(f"the tuning grid has not finished for {[m for m, g in settings.items() if g is None]}")
        for s in seeds:
            study.prepare(s)
        # Seed by seed, the centralized reference first: each finished seed is a complete set of records.
        study.run_all([r for s in seeds for r in [central_runs[seeds.index(s)], *(x for x in report_runs if x.seed == s)]])

    records = {fed: {m: {} for m in methods} for fed in feds}
    for r in report_runs:
        if (rec := study.record(r)) is not None:
            records[r.fed][r.method][r.seed] = rec
    central = {r.seed: rec for r in central_runs if (rec := study.record(r)) is not None}
    problems = [f"tuning grid: {r.name} has not finished" for r in grid if study.record(r) is None]
    problems += verdict(cfg, records)
    problems += [f"centralized seed {s} has not finished" for s in seeds if s not in central]
    summaries = []
    if not problems:
        bad = {s: set(records[study.bad]["fedavg"][s]["corrupted"]) for s in seeds}
        summaries = [summarize(cfg, fed, records[fed], central, bad) for fed in feds]
    done = {r.name: rec for r in [*grid, *central_runs, *report_runs] if (rec := study.record(r)) is not None}
    minutes = sum(rec["minutes"] for rec in done.values())
    cost = {"runs": len(done), "run_minutes": round(minutes, 1), "wall_minutes": round(minutes / cfg["parallel_jobs"], 1)}
    args.results.mkdir(parents=True, exist_ok=True)
    plot(cfg, records, central, args.results / "convergence.png")
    grid_records = {m: {} for m in methods}
    for r in grid:
        if (rec := study.record(r)) is not None:
            grid_records[r.method][setting_label(r.overrides)] = rec
    plot_grid(grid_records, args.results / "tuning.png")
    (args.results / "report.md").write_text(markdown(cfg, summaries, problems, settings, grid_dev, cost, done))
    summary = {"counts": not problems, "problems": problems, "settings": settings, "summaries": summaries, "cost": cost,
               "report": str(args.results / "report.md"), "seconds": round(time.time() - t0)}
    (args.results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("counts", "problems", "settings", "cost", "report")}))
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
