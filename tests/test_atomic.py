"""Atomic writes: one helper, a temporary name with the process id, nothing left after an error."""
import os
import re
from pathlib import Path

import numpy as np
import pytest

from fl_lib.atomic import atomic_path, owned_temp_glob
from fl_lib.features.stats import FeatsStats

ROOT = Path(__file__).resolve().parents[1]


def test_temp_name_holds_the_pid_and_the_extension(tmp_path):
    target = tmp_path / "cuts.jsonl.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and str(os.getpid()) in tmp.name and tmp.name.endswith(".jsonl.gz")
        assert not tmp.match(owned_temp_glob("fl_train"))  # untagged: no trainer removes it on resume
        tmp.write_text("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]
    with atomic_path(target, owner="fl_train") as tmp:
        assert tmp.match(owned_temp_glob("fl_train")) and tmp.name.endswith(".jsonl.gz")
        tmp.write_text("newer")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "feats_stats.npz"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_np_savez_writes_the_target_not_a_renamed_copy(tmp_path):
    """np.savez appends .npz to a name without it; the temp name must keep the extension."""
    path = FeatsStats(3, np.ones(2), np.ones(2)).save(tmp_path / "feats_stats.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["feats_stats.npz"] and FeatsStats.load(path).count == 3


def test_no_module_renames_temp_files_by_hand():
    """Write-then-rename lives in fl_lib/atomic.py only: one naming scheme, one cleanup glob."""
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "fl_lib").rglob("*.py")
        if p.name != "atomic.py" and re.search(r"os\.replace\(|\btmp\w*\.replace\(", p.read_text())
    ]
    assert offenders == []
