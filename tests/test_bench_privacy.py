"""bench/privacy.py: a run that the noise drove to non-finite updates is recorded as diverged, not lost."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from conftest import bench_module
from fl_lib.bin.fl_train import EXIT_DIVERGED

privacy = bench_module("privacy")
conv = privacy.convergence


def fake_study(tmp_path, status: int, validated: bool) -> SimpleNamespace:
    """A study whose fl_train is a process that counts rounds 1-2 (round 1 validated, if `validated`) and exits
    `status`; as fl_train, it writes valid.acc.best.pth whether or not a round was validated."""
    rows = [{"round": r, "dev_wer": 0.9 if validated and r == 1 else None, "train_seconds": 60.0,
             "privacy": {"next_clip": 10.0 * r}} for r in (1, 2)]
    script = (f"import pathlib, sys; out = pathlib.Path(sys.argv[1]); "
              f"(out / 'metrics.jsonl').write_text({''.join(json.dumps(r) + chr(10) for r in rows)!r}); "
              "(out / 'valid.acc.best.pth').write_bytes(b''); " + f"sys.exit({status})")
    return SimpleNamespace(cfg={"asr_config": "asr.yaml", "common": {}}, recipe=tmp_path, _call=conv.Study._call,
                           listing=lambda fed, seed: tmp_path / "clients.jsonl", corpus=lambda seed: tmp_path,
                           fl_train_command=lambda *a: [sys.executable, "-c", script, str(a[4])])


@pytest.mark.parametrize("status, validated, outcome", [(EXIT_DIVERGED, True, "diverged"), (0, True, "finished"),
                                                        (EXIT_DIVERGED, False, "no best-dev model"), (1, True, "exited 1")])
def test_only_fl_trains_diverged_status_after_a_validation_is_recorded_as_diverged(tmp_path, monkeypatch, status,
                                                                                    validated, outcome):
    monkeypatch.setattr(privacy, "decode_sets", lambda exp, data: {s: 0.99 for s in privacy.SETS})
    cfg = {"common": {}, "rounds": 2, "fl_config": "fl.yaml"}
    run = lambda: privacy.run_point(fake_study(tmp_path, status, validated), cfg, "sigma", {}, 11, tmp_path / "out",  # noqa: E731
                                    tmp_path / "results")
    if outcome in ("diverged", "finished"):
        stopped = run()["stopped"]
        assert stopped == ({"round": 2, "last_clip": 20.0} if outcome == "diverged" else None)
    else:
        with pytest.raises(RuntimeError, match=outcome):
            run()
        assert not (tmp_path / "results").exists()


def test_the_report_says_which_runs_diverged(tmp_path):
    ledger = {"noise_multiplier": 0.3, "next_clip": 12614.0, "epsilon": 50.0}
    wer = {s: 0.99 for s in privacy.SETS}
    records = [{"name": "sigma0.3", "seed": 11, "privacy": ledger, "wer": wer, "best_dev_round": 90, "minutes": 9.0,
                "stopped": {"round": 94, "reason": "...", "last_clip": 12614.0}},
               {"name": "no_dp", "seed": 11, "privacy": {}, "wer": wer, "best_dev_round": 100, "minutes": 5.0}]
    cfg = {"rounds": 100, "seeds": [11], "plan": {"populations": [], "cohorts": [], "delta": 1e-9}}
    text = privacy.report(cfg, records, 8)
    rows = [line for line in text.splitlines() if line.startswith("|sigma0.3|11|") or line.startswith("|no_dp|11|")]
    assert rows[0].endswith("|diverged: stopped at round 94, clip 1.26e+04|")
    assert rows[1].endswith("|100|5.0||")
