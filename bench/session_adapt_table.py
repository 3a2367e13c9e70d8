"""One table of session-adaptation variants, from their committed records (issue 20).

Each variant is a directory of `seed<N>/` records that egs/session_adapt's run.sh produced
(`summary.json`, and the federated adaptation's `fl_metrics.jsonl`). Per variant: the best
CTC-greedy dev WER of each seed (what settings are chosen on), and the pooled test WERR of the
LM-fused decoding and of the acoustic model alone (what is reported), each as the mean and a
95 % Student-t interval over seeds. Seeds are matched across variants: a variant missing a
seed that another has is an error, not a shorter mean. Under the table, the variants adapted
from different seed models (their records' sha256 differ: a seed recipe trained again, or
another seed on purpose) are named, and so are those whose records (before 2026-12-05) hold none.

    python bench/session_adapt_table.py default=bench/results/session_adapt \\
        specaug=bench/results/session_adapt/specaug
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curves import mean_interval  # noqa: E402

# The decodings' names as egs/session_adapt/run.sh gives them to session_results: the LM-fused
# one names its decoding config in brackets (tuned on dev or not), the acoustic model's is fixed.
LM = re.compile(r"LM fusion \([^()]+\)")
AM = re.compile(re.escape("acoustic model alone"))


def best_dev_wer(metrics: Path) -> tuple[float, int]:
    """(lowest dev WER %, its round) of a federated adaptation's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    scored = [(r["dev_wer"] * 100, r["round"]) for r in rows if r.get("dev_wer") is not None]
    if not scored:
        raise ValueError(f"{metrics}: no validated round")
    return min(scored)


def pooled_werr(summary: dict, decoding: re.Pattern) -> float:
    matches = [v for k, v in summary["decodings"].items() if decoding.fullmatch(k)]
    if len(matches) != 1:
        raise ValueError(f"{summary['exp_dir']}: {len(matches)} decodings named '{decoding.pattern}' "
                         f"among {sorted(summary['decodings'])}")
    return matches[0]["pooled_werr"]


def variant_rows(name: str, root: Path) -> dict[int, dict]:
    seeds = {}
    for d in sorted(root.glob("seed*/")):
        if not d.name[4:].isdigit() or not (d / "summary.json").exists():
            continue
        summary = json.loads((d / "summary.json").read_text())
        dev, rnd = best_dev_wer(d / "fl_metrics.jsonl")
        seeds[int(d.name[4:])] = {"dev": dev, "round": rnd, "lm": pooled_werr(summary, LM), "am": pooled_werr(summary, AM),
                                  "seed_model": (summary.get("seed") or {}).get("model_sha256")}
    if not seeds:
        raise ValueError(f"variant {name}: no seed<N>/summary.json under {root}")
    return seeds


def fmt(values: Sequence[float]) -> str:
    i = mean_interval(values)
    return f"{i.mean:.1f} ± {i.half_width:.1f}"


def table(variants: dict[str, Path]) -> str:
    rows = {name: variant_rows(name, root) for name, root in variants.items()}
    seeds = sorted(next(iter(rows.values())))
    for name, r in rows.items():
        if sorted(r) != seeds:
            raise ValueError(f"variant {name} has seeds {sorted(r)}, the first variant {seeds}: compare like with like")
    unrecorded = [name for name, r in rows.items() if any(r[s]["seed_model"] is None for s in seeds)]
    models: dict[str, list[str]] = {}
    for name, r in rows.items():
        for sha in {r[s]["seed_model"] for s in seeds} - {None}:
            models.setdefault(sha, []).append(name)
    head = ("| variant | best dev WER % (round), seeds " + "/".join(map(str, seeds)) + " | mean dev WER | "
            "LM fusion WERR %, per seed | mean ± 95 % t | acoustic model alone WERR %, per seed | mean ± 95 % t |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        per = [r[s] for s in seeds]
        lines.append(
            f"| {name} | " + " / ".join(f"{p['dev']:.1f} ({p['round']})" for p in per)
            + f" | {sum(p['dev'] for p in per) / len(per):.1f} | "
            + " / ".join(f"{p['lm']:.1f}" for p in per) + f" | {fmt([p['lm'] for p in per])} | "
            + " / ".join(f"{p['am']:.1f}" for p in per) + f" | {fmt([p['am'] for p in per])} |")
    if len(models) > 1:
        groups = "; ".join(f"{sha[:16]}: {', '.join(names)}" for sha, names in models.items())
        lines += ["", f"Adapted from different seed models (sha256 of exp/seed/model.pth): {groups}."]
    if unrecorded:
        lines += ["", f"Seed model not recorded (records before 2026-12-05), so not checked to be the same: {', '.join(unrecorded)}."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", help="name=directory of seed<N>/ records")
    args = p.parse_args(argv)
    variants = {}
    for v in args.variants:
        name, sep, root = v.partition("=")
        if not sep or not name or not root:
            p.error(f"'{v}': expected name=directory")
        variants[name] = Path(root)
    print(table(variants))


if __name__ == "__main__":
    main()
