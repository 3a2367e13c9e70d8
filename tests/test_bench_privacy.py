"""bench/privacy.py: a run that the noise drove to non-finite updates is recorded as diverged, not lost."""
from __future__ import annotations

from conftest import bench_module
from fl_lib.fl.server import FailedRound, RoundsFailedError

privacy = bench_module("privacy")


def stop_message(errors: dict) -> str:
    """fl_train's last words when 3 rounds in a row had no usable client, as fl_lib writes them."""
    failures = [FailedRound(draw=d, used=[], dropped=[] if errors else ["1052"], failed=list(errors), errors=errors)
                for d in (97, 98, 99)]
    return f"fl_train: {RoundsFailedError(failures, 1)}\n"


def test_divergence_is_recognized_only_with_fl_trains_reason_and_a_best_model(tmp_path):
    (tmp_path / "bench.log").write_text("round 1 ...\n" + stop_message({}))
    assert privacy.stopped_by_divergence(tmp_path) is None  # no validated model to report
    (tmp_path / "valid.acc.best.pth").write_bytes(b"")
    assert privacy.stopped_by_divergence(tmp_path) == (
        "3 sampled rounds in a row had fewer than min_clients_per_round=1 usable clients")
    (tmp_path / "bench.log").write_text("Traceback ...\nRuntimeError: CUDA out of memory\n")
    assert privacy.stopped_by_divergence(tmp_path) is None  # any other failure stays a failure
    (tmp_path / "bench.log").write_text(stop_message({"1052": "Traceback ...\nMemoryError"}))
    assert privacy.stopped_by_divergence(tmp_path) is None  # rounds lost to clients that raised: not divergence


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
