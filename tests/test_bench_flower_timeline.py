"""bench/flower_timeline.py: a SuperNode's DEBUG log split into the phases of each train task."""
from __future__ import annotations

import pytest

from conftest import bench_module

timeline = bench_module("flower_timeline")

TASK = """\x1b[92mINFO 2026-12-05 18:16:{s:02d},000\x1b[0m:      Receiving: train message (ID: ab)
\x1b[94mDEBUG 2026-12-05 18:16:{s:02d},500\x1b[0m:     Runtime.AcquireTask
\x1b[92mINFO 2026-12-05 18:16:{s1:02d},000\x1b[0m:      Start `flwr-clientapp` process
\x1b[94mDEBUG 2026-12-05 18:16:{s2:02d},000\x1b[0m:     Runtime.ConfirmMessageReceived
2026-12-05 18:16:{s4:02d},900 (client_app:120) INFO: trained client 1005 in {train} s
\x1b[94mDEBUG 2026-12-05 18:16:{s5:02d},000\x1b[0m:     Runtime.PushMessages
\x1b[94mDEBUG 2026-12-05 18:16:{s6:02d},000\x1b[0m:     Finished task 1 of run 2
\x1b[92mINFO 2026-12-05 18:16:{s6:02d},000\x1b[0m:      Sent successfully
\x1b[92mINFO 2026-12-05 18:16:{s6:02d},500\x1b[0m:      Sending: train message (ID: cd)
\x1b[92mINFO 2026-12-05 18:16:{s8:02d},500\x1b[0m:      Sent successfully
"""


def task(s, train, pull=1):
    return TASK.format(s=s, s1=s + 1, s2=s + 1 + pull, s4=s + 4, s5=s + 5, s6=s + 6, s8=s + 8, train=train)


def test_phases_of_each_task_and_their_medians(tmp_path):
    log = tmp_path / "supernode0.log"
    log.write_text(task(0, 3.5) + task(10, 2.5, pull=3) + task(20, 3.0))
    found = timeline.tasks(log)
    assert [t["train"] for t in found] == [3.5, 2.5, 3.0]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in timeline.table(found).splitlines()[2:]}
    assert rows["SuperLink -> SuperNode, and the SuperExec's poll for a ClientApp to start"] == "1.00"
    assert rows["the ClientApp pulls the task and its weights from the SuperNode"] == "1.00"  # 1, 3, 1 s
    assert rows["SuperNode -> SuperLink (the reply)"] == "2.00"  # from 'Sending', not the query's earlier 'Sent'
    assert rows["the whole task, received to sent"] == "8.50"
    assert rows["of which training, by the trainer's clock"] == "3.00"


def test_a_log_without_debug_steps_is_refused(tmp_path):
    log = tmp_path / "supernode0.log"
    log.write_text("INFO 2026-12-05 18:16:00,000:      Receiving: train message (ID: ab)\n")
    with pytest.raises(ValueError, match="FLWR_LOG_LEVEL=DEBUG"):
        timeline.tasks(log)
