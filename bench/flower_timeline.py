"""Where a flower-grpc task's time goes, read from the SuperNodes' DEBUG logs (issue 24).

A train message crosses Flower's deployment three times each way: SuperLink -> SuperNode,
SuperNode -> the per-message `flwr-clientapp` process, and back. With `FLWR_LOG_LEVEL=DEBUG`
each SuperNode logs the steps with timestamps; this script splits every train task into
phases and gives their medians over the run's tasks. Training time is the trainer's own
("trained client <id> in <s> s", fl_lib.flower.client_app).

    FLWR_LOG_LEVEL=DEBUG python -m fl_lib.bin.flower_train --nodes 2 --engine grpc ... --output_dir EXP
    python bench/flower_timeline.py EXP/flower/logs/supernode*.log
"""
from __future__ import annotations

import argparse
import datetime
import re
import statistics
from pathlib import Path

STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
COLOUR = re.compile(r"\x1b\[[0-9;]*m")
TRAINED = re.compile(r"trained client \S+ in ([\d.]+) s")
# (event, the log text that marks it), in the order a task passes them
EVENTS = (("receive", "Receiving: train message"), ("spawn", "Start `flwr-clientapp` process"),
          ("pulled", "Runtime.ConfirmMessageReceived"), ("push", "Runtime.PushMessages"),
          ("finished", "Finished task"), ("send", "Sending: train message"), ("sent", "Sent successfully"))
PHASES = (("SuperLink -> SuperNode, and the SuperExec's poll for a ClientApp to start", "receive", "spawn"),
          ("the ClientApp pulls the task and its weights from the SuperNode", "spawn", "pulled"),
          ("the ClientApp loads and trains (the resident trainer)", "pulled", "push"),
          ("the ClientApp pushes its reply to the SuperNode", "push", "finished"),
          ("SuperNode -> SuperLink (the reply)", "send", "sent"),
          ("the whole task, received to sent", "receive", "sent"))


def stamp(line: str) -> datetime.datetime | None:
    m = STAMP.search(line)
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") if m else None


def tasks(log: Path) -> list[dict]:
    """Each train task of one SuperNode's log: {event: time, "train": seconds}."""
    found: list[dict] = []
    for line in log.read_text(errors="replace").splitlines():
        line = COLOUR.sub("", line)
        t = stamp(line)
        if EVENTS[0][1] in line:
            found.append({"receive": t})
            continue
        if not found:
            continue
        task = found[-1]
        m = TRAINED.search(line)
        if m:
            task["train"] = float(m.group(1))
        for event, text in EVENTS[1:]:
            if t is not None and text in line and event not in task and (event != "sent" or "send" in task):
                task[event] = t
    complete = [t for t in found if all(e in t for e, _ in EVENTS) and "train" in t]
    if len(complete) != len(found):
        raise ValueError(f"{log}: {len(found) - len(complete)} of {len(found)} train tasks lack a step "
                         "(was FLWR_LOG_LEVEL=DEBUG set, and did the run finish?)")
    return complete


def table(all_tasks: list[dict]) -> str:
    if not all_tasks:
        raise ValueError("no train task in the logs")
    lines = [f"| phase ({len(all_tasks)} train tasks) | median s | range s |", "|---|---|---|"]
    for name, a, b in PHASES:
        v = [(t[b] - t[a]).total_seconds() for t in all_tasks]
        lines.append(f"| {name} | {statistics.median(v):.2f} | {min(v):.2f}–{max(v):.2f} |")
    train = [t["train"] for t in all_tasks]
    lines.append(f"| of which training, by the trainer's clock | {statistics.median(train):.2f} | {min(train):.2f}–{max(train):.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", type=Path, nargs="+", help="the SuperNodes' logs (<exp>/flower/logs/supernode*.log)")
    args = p.parse_args()
    print(table([t for log in args.logs for t in tasks(log)]))


if __name__ == "__main__":
    main()
