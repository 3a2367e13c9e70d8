"""Generate an experiment's RESULTS.md in ESPnet's layout (never edit it by hand).

Reads what the trainer and decoding left in the experiment: `asr_config.yaml`
(else ESPnet's full `config.yaml`), `fl_config.yaml`, `metrics.jsonl`, and one
`score.json` per decoded set.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import subprocess
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import yaml

from fl_lib.asr.scoring import ErrorStats, format_table

PLOT = Path("images") / "dev_curve.png"


def _git(args: list[str], cwd: Path) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "N/A"
    return out.stdout.strip()


def environment() -> dict[str, str]:
    """Versions and code revision, so a table can be traced to what produced it."""
    code = Path(__file__).resolve().parent

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "N/A"

    return {
        "date": datetime.datetime.now().astimezone().strftime("%a %b %d %H:%M:%S %Z %Y"),
        "python version": f"{platform.python_version()} ({platform.platform()})",
        "espnet version": f"espnet {version('espnet')}",
        "pytorch version": f"pytorch {version('torch')}",
        "lhotse version": f"lhotse {version('lhotse')}",
        "fl_lib version": f"fl_lib {version('fl_lib')}",
        "Git hash": _git(["rev-parse", "HEAD"], code),
        "Commit date": _git(["log", "-1", "--format=%cd"], code),
    }


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows in file order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclasses.dataclass(frozen=True)
class ClientStats:
    """How much a client shaped the model: rounds aggregated, mean weight, rounds dropped or failed."""

    client: str
    rounds: int
    mean_weight: float
    dropped: int
    failed: int


def client_stats(metrics: Sequence[dict[str, Any]]) -> list[ClientStats]:
    """Per-client participation, from each round's clients/weights/dropped lists."""
    weights: dict[str, list[float]] = defaultdict(list)
    dropped: dict[str, int] = defaultdict(int)
    failed: dict[str, int] = defaultdict(int)
    for row in metrics:
        if len(row["clients"]) != len(row["weights"]):
            raise ValueError(f"round {row['round']}: {len(row['clients'])} clients but {len(row['weights'])} weights")
        for client, weight in zip(row["clients"], row["weights"]):
            weights[str(client)].append(float(weight))
        for client in row.get("dropped", []):
            dropped[str(client)] += 1
        for client in row.get("failed", []):
            failed[str(client)] += 1
    return [
        ClientStats(c, len(weights[c]), sum(weights[c]) / len(weights[c]) if weights[c] else 0.0,
                    dropped[c], failed[c])
        for c in sorted(set(weights) | set(dropped) | set(failed))
    ]


def failing_clients(last_row: dict[str, Any]) -> list[str]:
    """Lines naming the clients that never trained or were dropped for failing, as of the last round.

    A client left out of training must be visible where the results are read, not only in train.log."""
    names = lambda ids: ", ".join(f"`{c}`" for c in ids)  # noqa: E731
    lines = []
    if last_row.get("always_failed"):
        lines += ["", f"**Never trained**: raised in every round they were sampled in: {names(last_row['always_failed'])} "
                      "(their tracebacks are in train.log)."]
    if last_row.get("excluded"):
        lines += ["", f"**Dropped** after max_client_failures failures in a row (drop_failing_clients): "
                      f"{names(last_row['excluded'])}; left out of every later round."]
    return lines


def privacy_lines(last_row: dict[str, Any]) -> list[str]:
    """The DP ledger after the last round (privacy.* in fl_config), where the results are read."""
    p = last_row.get("privacy")
    if not p:
        return []
    relation = "replace-one, cohorts of K without replacement" if p["sampler"] == "uniform" else "add-or-remove, Poisson cohorts"
    return [f"- **client-level DP**: (ε = {p['epsilon']:.3g}, δ = {p['delta']:.3g}) after {p['rounds_charged']} sampled rounds; "
            f"noise multiplier σ = {p['noise_multiplier']:.4g}, clip C = {p['next_clip']:g} after the last round"
            f"{' per layer' if p['per_layer'] else ''}, sampling rate q = {p['sampling_rate']:.4g} "
            f"({p['accountant'].upper()} accountant, {relation})"]


def plot_dev_curve(metrics: Sequence[dict[str, Any]], png: Path) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    dev_curve_figure(metrics).savefig(png, dpi=100, bbox_inches="tight")


def dev_curve_figure(metrics: Sequence[dict[str, Any]]):
    """Loss (train and dev), dev accuracy and CTC-greedy dev WER against round, drawn without a display (Agg).

    A CTC-only model reports no accuracy: its figure has no accuracy panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    unit = _unit(metrics)

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r[unit], r[key]) for r in metrics if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    has_acc = bool(series("dev_acc")[0])
    fig = Figure(figsize=(6, 8 if has_acc else 5.5))
    FigureCanvasAgg(fig)
    panels = fig.subplots(3 if has_acc else 2, 1, sharex=True)
    loss, wer = panels[0], panels[-1]
    loss.plot(*series("train_loss"), label="train loss", color="tab:gray")
    loss.plot(*series("dev_loss"), label="dev loss", marker="o", color="tab:blue")
    loss.set_ylabel("loss")
    loss.legend()
    loss.grid(alpha=0.3)
    if has_acc:
        panels[1].plot(*series("dev_acc"), marker="o", color="tab:green")
        panels[1].set_ylabel("dev accuracy")
        panels[1].grid(alpha=0.3)
    rounds, wers = series("dev_wer")
    wer.plot(rounds, [100 * w for w in wers], marker="o", color="tab:red")
    wer.set_ylabel("dev WER % (CTC greedy)")
    wer.set_xlabel(unit)
    wer.xaxis.set_major_locator(MaxNLocator(integer=True))
    wer.grid(alpha=0.3)
    return fig


def _unit(metrics: Sequence[dict[str, Any]]) -> str:
    """What one metrics row is: a federated round, or an epoch of the centralized reference."""
    return "round" if all("round" in r for r in metrics) else "epoch"


def compute_lines(exp_dir: Path, metrics: Sequence[dict[str, Any]]) -> list[str]:
    """The training compute in CPU-seconds, the currency of the centralized reference's budget
    (none for a run older than that budget)."""
    if not metrics:
        return []
    if _unit(metrics) == "round":
        if any("client_cpu_seconds" not in r for r in metrics):
            return []
        return [f"- training compute: {sum(r['client_cpu_seconds'] for r in metrics) / 60:.1f} client CPU-minutes "
                "(time.process_time of each client's local training, summed over workers): the budget a "
                "centralized reference of this run gets"]
    if "train_cpu_seconds" not in metrics[-1]:
        return []
    line = f"- training compute: {metrics[-1]['train_cpu_seconds'] / 60:.1f} CPU-minutes of its one process (time.process_time, training only)"
    conf = exp_dir / "centralized_config.yaml"
    budget = (yaml.safe_load(conf.read_text()) or {}).get("budget_cpu_seconds") if conf.is_file() else None
    if budget is not None:
        line += (f", budget {budget / 60:.1f}: the federated run's client CPU-seconds "
                 "(time.process_time summed over workers)")
    return [line]


def collect_scores(decode_dirs: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """{"<decode dir>/<set>": score.json} over every set subdirectory, ESPnet's dataset naming."""
    scores = {}
    for decode_dir in decode_dirs:
        for path in sorted(Path(decode_dir).glob("*/score.json")):
            scores[f"{Path(decode_dir).name}/{path.parent.name}"] = json.loads(path.read_text())
    if not scores:
        raise FileNotFoundError(f"no <set>/score.json under {[str(d) for d in decode_dirs]}: run decoding first")
    return scores


def _config_block(*candidates: Path) -> str:
    """The first existing config file as a collapsed yaml block."""
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{candidates[0]} missing: the trainer writes it into the experiment dir")
    return (f"<details><summary>{path.name}</summary>\n\n```yaml\n{path.read_text().rstrip()}\n```\n\n"
            "</details>")


def render(exp_dir: Path, decode_dirs: Sequence[Path], metrics: Sequence[dict[str, Any]]) -> str:
    """The RESULTS.md text; the plot must already exist at exp_dir/images/dev_curve.png."""
    scores = collect_scores(decode_dirs)
    lines = ["<!-- Generated by fl_lib.bin.make_results: do not edit by hand -->", "# RESULTS",
             "## Environments"]
    env = environment()
    commit_date = env.pop("Commit date")
    lines += [f"- {k}: `{v}`" for k, v in env.items()] + [f"  - Commit date: `{commit_date}`", ""]

    unit = _unit(metrics)
    if unit == "round":
        minutes = sum(r.get("seconds", 0.0) for r in metrics) / 60
    else:  # the centralized reference's rows carry the cumulative training time
        minutes = metrics[-1]["train_seconds"] / 60 if metrics else 0.0
    lines += [f"## {exp_dir.name}", "",
              f"- experiment: `{exp_dir}`",
              f"- {unit}s: {len(metrics)}, training time: {minutes:.1f} min"]
    lines += compute_lines(exp_dir, metrics)
    lines += privacy_lines(metrics[-1] if metrics else {})
    accs = [r for r in metrics if r.get("dev_acc") is not None]
    if accs:
        best = max(accs, key=lambda r: r["dev_acc"])
        lines.append(f"- best dev accuracy: {best['dev_acc']:.4f} ({unit} {best[unit]})")
    lines += ["", "### Configs", "", _config_block(exp_dir / "asr_config.yaml", exp_dir / "config.yaml"), "",
              _config_block(exp_dir / "fl_config.yaml", exp_dir / "centralized_config.yaml"), ""]

    lines += ["### Decoding", "", "|dataset|model|utts|hours|RTF|inference config|", "|---|---|---|---|---|---|"]
    for name, s in scores.items():
        conf = ", ".join(f"{k}={v}" for k, v in s.get("inference_config", {}).items())
        lines.append(f"|{name}|{s['model']}|{s['num_utts']}|{s['audio_seconds'] / 3600:.2f}|{s['rtf']}|{conf}|")
    for metric in ("WER", "CER"):
        rows = {name: ErrorStats.from_dict(s[metric.lower()]) for name, s in scores.items()}
        lines += ["", f"### {metric}", "", format_table(rows)]
    lines += ["", "### WER per speaker"]
    for name, s in scores.items():
        rows = {spk: ErrorStats.from_dict(d) for spk, d in s["per_speaker_wer"].items()}
        lines += ["", f"#### {name}", "", format_table(rows, "speaker")]

    if unit == "round":
        lines += ["", "### Federated clients", "",
                  "|client|rounds|mean weight|dropped|failed|", "|---|---|---|---|---|"]
        lines += [f"|{c.client}|{c.rounds}|{c.mean_weight:.4f}|{c.dropped}|{c.failed}|" for c in client_stats(metrics)]
        lines += failing_clients(metrics[-1] if metrics else {})
    lines += ["", "### Training curve", "", f"![dev loss, accuracy and WER per {unit}]({PLOT.as_posix()})", ""]
    return "\n".join(lines)


def make_results(exp_dir: Path, decode_dirs: Sequence[Path]) -> Path:
    """Write exp_dir/RESULTS.md and the plot it embeds; returns the markdown path."""
    exp_dir = Path(exp_dir)
    metrics_path = exp_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} missing: the trainer writes one line per round")
    metrics = read_metrics(metrics_path)
    plot_dev_curve(metrics, exp_dir / PLOT)
    out = exp_dir / "RESULTS.md"
    out.write_text(render(exp_dir, decode_dirs, metrics), encoding="utf-8")
    return out
