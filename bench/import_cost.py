"""What a fresh process pays before it can train or decode: importing ESPnet's ASR task.

Every client job, every Flower ClientApp message, every decoding job and every test
subprocess imports `espnet2.tasks.asr`. Each --python interpreter imports it --repeats
times in a fresh process, alternating between interpreters; the CPU-seconds (user +
system, from the child's rusage) and the wall seconds are reported as medians, with the
installed typeguard and inflect versions and the modules of largest self time
(`-X importtime`, last repeat). Ratios are taken within one run (the machine is noisy).

    .venv/bin/python bench/import_cost.py                                   # this environment
    .venv/bin/python bench/import_cost.py --python /old/.venv/bin/python --python .venv/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROBE = ("import espnet2.tasks.asr\n"
         "from importlib.metadata import version\n"
         "print(version('typeguard'), version('inflect'))\n")


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def import_once(python: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cpu, wall = child_cpu_seconds(), time.perf_counter()
    proc = subprocess.run([python, "-X", "importtime", "-c", PROBE], env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - wall, child_cpu_seconds() - cpu
    if proc.returncode != 0:
        raise SystemExit(f"{python} could not import espnet2.tasks.asr:\n{proc.stderr[-2000:]}")
    typeguard, inflect = proc.stdout.splitlines()[-1].split()  # ESPnet prints a Flash Attention notice first
    return {"cpu_s": cpu, "wall_s": wall, "typeguard": typeguard, "inflect": inflect,
            "top_self_us": top_self_times(proc.stderr)}


def top_self_times(importtime: str, n: int = 8) -> dict[str, int]:
    """The n modules of largest self time (microseconds) in `-X importtime` output."""
    rows = []
    for line in importtime.splitlines():
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            self_us, _, name = line[len("import time:"):].split("|")
            rows.append((int(self_us), name.strip()))
    return {name: us for us, name in sorted(rows, reverse=True)[:n]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", action="append", help="interpreters to compare (default: this one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "import_cost.json")
    args = parser.parse_args()
    pythons = args.python or [sys.executable]
    runs = {p: [] for p in pythons}
    for _ in range(args.repeats):
        for p in pythons:
            runs[p].append(import_once(p))
    report = []
    for p, rows in runs.items():
        report.append({"python": p, "typeguard": rows[-1]["typeguard"], "inflect": rows[-1]["inflect"],
                       "cpu_s_median": round(statistics.median(r["cpu_s"] for r in rows), 2),
                       "wall_s_median": round(statistics.median(r["wall_s"] for r in rows), 2),
                       "repeats": len(rows), "top_self_us": rows[-1]["top_self_us"]})
    if len(report) > 1:
        base = report[0]["cpu_s_median"]
        for row in report:
            row["cpu_ratio_to_first"] = round(row["cpu_s_median"] / base, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for row in report:
        print(f"{row['python']}: typeguard {row['typeguard']}, inflect {row['inflect']}: "
              f"{row['cpu_s_median']} CPU-s, {row['wall_s_median']} s wall (median of {row['repeats']})")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
