"""Faults injected into fl_train: unsafe, truncated and corrupted checkpoints, ENOSPC and EIO while
writing, another writer's temporary files, clients that always fail, audio that vanishes between
rounds, and a checkpoint written by the code before these checks (commit 034dec7). Stage 6's
faults are in test_faults_stage6.py.
"""
from __future__ import annotations

import ast
import errno
import json
import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from test_fl_train import CONF_DIR, FAST, _listing, metrics, run_inprocess

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "034dec7"  # main before safe loading: its checkpoints must still resume


class Plant:
    """A pickle whose loading creates `marker`: what a malicious checkpoint.pth could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- safe loading -----------------------------------------------------------

def test_every_torch_load_in_fl_lib_is_weights_only():
    """A file the run did not just write may come from anyone: no full unpickler anywhere in fl_lib."""
    unsafe = []
    for path in (REPO / "fl_lib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    unsafe.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert unsafe == []


def test_resume_refuses_a_malicious_checkpoint_and_never_runs_it(fl_data, tmp_path):
    from fl_lib.bin.fl_train import main
    from fl_lib.fl.checkpoint import CheckpointError

    out, marker = tmp_path / "exp", tmp_path / "pwned"
    out.mkdir()
    torch.save({"round": 1, "model": {"w": torch.zeros(1)}, "payload": Plant(marker)}, out / "checkpoint.pth")
    with pytest.raises(CheckpointError, match=rf"{out / 'checkpoint.pth'}: refused.*GLOBAL (io|builtins)\.open"):
        run_inprocess(fl_data, out, "fl_fedavg.yaml", ["rounds=1"])
    argv = ["--asr_config", fl_data["asr_config"], "--fl_config", CONF_DIR / "fl_fedavg.yaml",
            "--train_clients", fl_data["train_clients"], "--token_list", fl_data["token_list"],
            "--bpemodel", fl_data["bpemodel"], "--feats_stats", fl_data["feats_stats"], "--output_dir", out, *FAST, "rounds=1"]
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    assert str(exit_.value.code).startswith(f"fl_train: {out / 'checkpoint.pth'}: refused")
    assert not marker.exists()
    assert not (out / "metrics.jsonl").exists() and not (out / "1round.pth").exists()


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":  # what a copy cut short leaves
        path.write_bytes(data[: len(data) // 2])
    else:  # the zip's directory records overwritten
        path.write_bytes(data[:2000] + bytes(range(256)) * 4 + data[3024:])


def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_previous_round_resumes(fl_data, tmp_path, caplog):
    """Round 2's checkpoint truncated: refused by name, kept aside, and round 2 redone from round 1's
    checkpoint gives round 2's model bit for bit. With both damaged (one truncated, one with its
    zip directory overwritten), the run stops naming the file."""
    from fl_lib.fl.checkpoint import CheckpointError

    out = tmp_path / "exp"
    run_inprocess(fl_data, out, "fl_fedavg.yaml", ["rounds=2"])
    ckpt, prev = out / "checkpoint.pth", out / "checkpoint.prev.pth"
    assert torch.load(prev, weights_only=False)["round"] == 1
    straight = torch.load(out / "latest.pth")
    _damage(ckpt, "truncated")
    damaged = ckpt.read_bytes()
    with caplog.at_level(logging.INFO):
        run_inprocess(fl_data, out, "fl_fedavg.yaml", ["rounds=2"])
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"{ckpt}: unreadable, truncated or corrupted")
    assert errors[0].endswith(f"kept as checkpoint.damaged.pth, resuming from the previous checkpoint, {prev}")
    assert f"resumed from {prev}: 1 of 2 rounds done" in caplog.text
    assert (out / "checkpoint.damaged.pth").read_bytes() == damaged
    resumed = torch.load(out / "latest.pth")
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert [r["round"] for r in metrics(out)] == [1, 2] and torch.load(ckpt, weights_only=False)["round"] == 2

    _damage(ckpt, "truncated")
    _damage(prev, "overwritten")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(prev))}: unreadable, truncated or corrupted"):
        run_inprocess(fl_data, out, "fl_fedavg.yaml", ["rounds=3"])
    assert [r["round"] for r in metrics(out)] == [1, 2]


def test_a_kill_between_keeping_the_previous_checkpoint_and_writing_the_next_resumes_from_it(fl_data, tmp_path, caplog):
    out = tmp_path / "exp"
    run_inprocess(fl_data, out, "fl_fedavg.yaml", ["rounds=2"])
    straight = torch.load(out / "latest.pth")
    # save_checkpoint killed after keeping round 1's checkpoint, before writing round 2's
    (out / "checkpoint.pth").unlink()
    with caplog.at_level(logging.INFO):
        run_inprocess(fl_data, out, "fl_fedavg.yaml", ["rounds=2"])
    assert f"resumed from {out / 'checkpoint.prev.pth'}: 1 of 2 rounds done" in caplog.text
    assert "checkpoint.pth is missing and checkpoint.prev.pth is there" in caplog.text
    assert [r["round"] for r in metrics(out)] == [1, 2]  # round 2's row of the killed run was dropped, then redone
    resumed = torch.load(out / "latest.pth")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_a_seed_model_that_is_not_weights_only_is_refused(tmp_path, monkeypatch):
    """Even where torch's own default is unsafe (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD), the seed import loads weights only."""
    import yaml

    from fl_lib.adapt.seed import SeedError, import_seed

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    seed_exp, marker = tmp_path / "seed_exp", tmp_path / "pwned"
    seed_exp.mkdir()
    (seed_exp / "config.yaml").write_text(yaml.safe_dump({"token_list": ["<blank>", "a"], "bpemodel": str(tmp_path / "bpe.model")}))
    (seed_exp / "asr_config.yaml").write_text("encoder: rnn\n")
    torch.save({"ctc.ctc_lo.weight": torch.zeros(2, 1), "payload": Plant(marker)}, seed_exp / "valid.acc.best.pth")
    with pytest.raises(SeedError, match=rf"seed model {seed_exp / 'valid.acc.best.pth'}: refused"):
        import_seed(seed_exp, "valid.acc.best.pth", tmp_path / "out")
    assert not marker.exists()


def test_a_checkpoint_of_the_code_before_resumes_bitwise(fl_data, tmp_path):
    """Round 1 by the code of 034dec7 (full unpickler, no max_client_failures key), round 2 by this code:
    the model of an uninterrupted 2-round run of the old code, bit for bit."""
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{OLD_COMMIT}^{{commit}}"], capture_output=True).returncode:
        pytest.skip(f"commit {OLD_COMMIT} is not in this clone (shallow?)")
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "fl_lib"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    argv = [sys.executable, "-m", "fl_lib.bin.fl_train", "--asr_config", fl_data["asr_config"],
            "--fl_config", CONF_DIR / "fl_bmuf.yaml", "--train_clients", fl_data["train_clients"],
            "--dev_cuts", fl_data["dev_cuts"], "--token_list", fl_data["token_list"], "--bpemodel", fl_data["bpemodel"],
            "--feats_stats", fl_data["feats_stats"], "--seed", "7"]  # BMUF: its momentum must survive the resume

    def fl_train(code: Path, out: Path, rounds: int) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code)}
        cmd = [str(a) for a in [*argv, "--output_dir", out, *FAST, f"rounds={rounds}"]]
        proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    fl_train(old, tmp_path / "straight", 2)
    fl_train(old, tmp_path / "resumed", 1)
    assert "max_client_failures" not in torch.load(tmp_path / "resumed/checkpoint.pth", weights_only=False)["fl_config"]
    proc = fl_train(REPO, tmp_path / "resumed", 2)
    assert f"resumed from {tmp_path / 'resumed/checkpoint.pth'}: 1 of 2 rounds done" in proc.stderr
    a, b = torch.load(tmp_path / "straight/latest.pth"), torch.load(tmp_path / "resumed/latest.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["clients"] for r in metrics(tmp_path / "resumed")] == [r["clients"] for r in metrics(tmp_path / "straight")]


# -- crash-consistent files -------------------------------------------------

def _fail_with(code: int):
    return OSError(code, os.strerror(code))


def test_enospc_while_writing_the_checkpoint_keeps_the_previous_one(fl_data, tmp_path, monkeypatch):
    from fl_lib.fl.checkpoint import load_checkpoint

    run_inprocess(fl_data, tmp_path / "straight", "fl_fedavg.yaml", ["rounds=2"])
    out = tmp_path / "exp"
    run_inprocess(fl_data, out, "fl_fedavg.yaml", ["rounds=1"])
    before = (out / "checkpoint.pth").read_bytes()
    save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if "checkpoint.pth" in str(f):
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise _fail_with(errno.ENOSPC)
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        run_inprocess(fl_data, out, "fl_fedavg.yaml", ["rounds=2"])
    monkeypatch.undo()
    assert (out / "checkpoint.pth").read_bytes() == before and load_checkpoint(out / "checkpoint.pth")["round"] == 1
    assert not list(out.glob(".tmp*"))
    assert [r["round"] for r in metrics(out)] == [1, 2]  # round 2 was logged, not checkpointed: resume drops it
    run_inprocess(fl_data, out, "fl_fedavg.yaml", ["rounds=2"])
    assert [r["round"] for r in metrics(out)] == [1, 2]
    a, b = torch.load(tmp_path / "straight/latest.pth"), torch.load(out / "latest.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eio_while_appending_to_metrics_leaves_no_half_line(fl_data, tmp_path, monkeypatch):
    import fl_lib.atomic

    out = tmp_path / "exp"
    run_inprocess(fl_data, out, "fl_fedavg.yaml", ["rounds=1"])
    before = (out / "metrics.jsonl").read_bytes()

    def failing_write(fd, data):  # half the line reaches the disk, then the device fails
        os.write(fd, data[: len(data) // 2])
        raise _fail_with(errno.EIO)

    monkeypatch.setattr(fl_lib.atomic, "os", types.SimpleNamespace(**{**vars(os), "write": failing_write}))
    with pytest.raises(OSError, match="Input/output error"):
        run_inprocess(fl_data, out, "fl_fedavg.yaml", ["rounds=2"])
    monkeypatch.undo()
    assert (out / "metrics.jsonl").read_bytes() == before
    run_inprocess(fl_data, out, "fl_fedavg.yaml", ["rounds=2"])
    assert [r["round"] for r in metrics(out)] == [1, 2]


def test_resume_rewrites_metrics_atomically(tmp_path, monkeypatch):
    """A rewrite that fails part-way (ENOSPC) leaves the old metrics.jsonl, whose rounds rank the checkpoints."""
    from fl_lib.fl.checkpoint import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"round": r, "dev_acc": r / 10}) + "\n" for r in (1, 2, 3)))
    before = path.read_bytes()
    write_text = Path.write_text

    def disk_full(self, data, *args, **kwargs):
        write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise _fail_with(errno.ENOSPC)

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError):
        truncate_metrics(path, "round", 2, "fl_train")
    monkeypatch.undo()
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
    path.write_bytes(before + b'{"round": 4, "dev_ac')  # an append cut short by a crash
    assert [r["round"] for r in truncate_metrics(path, "round", 2, "fl_train")] == [1, 2]
    assert [json.loads(line)["round"] for line in path.read_text().splitlines()] == [1, 2]


def test_resume_removes_only_its_own_temporary_files(fl_data, tmp_path):
    """A decode averaging a model into the same directory must not lose its half-written file to a resume."""
    from fl_lib.atomic import temp_path
    from fl_lib.fl.server import OWNER

    out = tmp_path / "exp"
    run_inprocess(fl_data, out, "fl_fedavg.yaml", ["rounds=1"])
    ours = temp_path(out / "checkpoint.pth", OWNER)  # what a trainer killed mid-write leaves
    foreign = temp_path(out / "valid.acc.ave.pth")  # a decode writing the average right now
    for p in (ours, foreign):
        p.write_bytes(b"half-written")
    run_inprocess(fl_data, out, "fl_fedavg.yaml", ["rounds=2"])
    assert not ours.exists() and foreign.read_bytes() == b"half-written"


# -- clients that fail ------------------------------------------------------

def _results(out: Path) -> str:
    """RESULTS.md of the experiment, with a stand-in decoding (stage 6 needs one)."""
    from fl_lib.asr.decode import Hypothesis, write_outputs
    from fl_lib.asr.results import make_results

    write_outputs([Hypothesis("u1", "s1", "A B", "A B", 1.0, 0.1)], out / "decode" / "dev-clean", {"model": "latest.pth"})
    return make_results(out, [out / "decode"]).read_text()


def test_a_client_that_always_fails_is_named_in_the_log_metrics_and_results(fl_data, tmp_path, caplog):
    from fl_lib.data.clients import load_clients

    ids = [c.id for c in load_clients(fl_data["train_clients"])]
    broken = ids[0]
    data = {**fl_data, "train_clients": _listing(tmp_path, fl_data, {broken})}
    out = tmp_path / "exp"
    caplog.set_level(logging.WARNING, logger="fl_lib.fl.server")
    run_inprocess(data, out, "fl_fedavg.yaml", ["rounds=2", f"clients_per_round={len(ids)}"])
    assert [r["always_failed"] for r in metrics(out)] == [[broken], [broken]]
    assert [r["failed"] for r in metrics(out)] == [[broken], [broken]]
    assert f"round 2: never trained, failed in every round they were sampled in: {broken} (2x)" in caplog.text
    assert f"**Never trained**: raised in every round they were sampled in: `{broken}`" in _results(out)


def test_max_client_failures_stops_the_run_with_the_first_traceback(fl_data, tmp_path):
    from fl_lib.data.clients import load_clients
    from fl_lib.fl.server import ClientFailuresError

    ids = [c.id for c in load_clients(fl_data["train_clients"])]
    data = {**fl_data, "train_clients": _listing(tmp_path, fl_data, {ids[1]})}
    out = tmp_path / "exp"
    with pytest.raises(ClientFailuresError) as error:
        run_inprocess(data, out, "fl_fedavg.yaml", ["rounds=3", f"clients_per_round={len(ids)}", "max_client_failures=2"])
    message = str(error.value)
    assert message.startswith(f"client {ids[1]} failed in 2 sampled rounds in a row (max_client_failures=2")
    assert "first traceback (draw 1):\nTraceback" in message and "missing.jsonl.gz" in message
    assert [r["round"] for r in metrics(out)] == [1]  # the round that reached the limit is not aggregated


def test_drop_failing_clients_leaves_the_client_out_across_a_resume(fl_data, tmp_path, caplog):
    """Failures in a row are counted across a resume: round 1 by one process, rounds 2 and 3 by another."""
    from fl_lib.data.clients import load_clients

    ids = [c.id for c in load_clients(fl_data["train_clients"])]
    broken = ids[2]
    data = {**fl_data, "train_clients": _listing(tmp_path, fl_data, {broken})}
    out, conf = tmp_path / "exp", [f"clients_per_round={len(ids)}", "max_client_failures=2", "drop_failing_clients=true"]
    run_inprocess(data, out, "fl_fedavg.yaml", ["rounds=1", *conf])
    caplog.set_level(logging.WARNING, logger="fl_lib.fl.server")
    run_inprocess(data, out, "fl_fedavg.yaml", ["rounds=3", *conf])
    rows = metrics(out)
    assert [r["failed"] for r in rows] == [[broken], [broken], []]
    assert [r["excluded"] for r in rows] == [[], [broken], [broken]]
    assert sorted(rows[2]["clients"]) == sorted(set(ids) - {broken})
    assert f"round 3: left out ['{broken}']" in caplog.text
    assert f"**Dropped** after max_client_failures failures in a row (drop_failing_clients): `{broken}`" in _results(out)


def test_failure_options_that_do_nothing_are_errors():
    from fl_lib.fl.config import FLConfig

    with pytest.raises(ValueError, match="drop_failing_clients: true does nothing without max_client_failures"):
        FLConfig(drop_failing_clients=True)
    with pytest.raises(ValueError, match="max_client_failures must be >= 1"):
        FLConfig(max_client_failures=0)


def _vanishing_listing(tmp_path: Path, fl_data) -> tuple[Path, str, Path]:
    """(clients.jsonl, client id, its audio dir): one client whose audio is a private copy that a test may delete."""
    import shutil
    from dataclasses import replace

    from lhotse import CutSet, Recording, load_manifest_lazy

    from fl_lib.data.clients import load_clients

    clients = load_clients(fl_data["train_clients"])
    victim, audio = clients[0], tmp_path / "audio"
    audio.mkdir()
    cuts = []
    for cut in load_manifest_lazy(victim.manifest):
        src = Path(cut.recording.sources[0].source)
        copy = Path(shutil.copy(src, audio / src.name))
        cuts.append(replace(cut, recording=Recording.from_file(copy, recording_id=cut.recording_id)))
    manifest = tmp_path / "victim.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(manifest)
    listing = tmp_path / "clients.jsonl"
    listing.write_text("".join(
        json.dumps({"id": c.id, "num_cuts": c.num_cuts, "duration": c.duration,
                    "manifest": str(manifest if c.id == victim.id else c.manifest)}) + "\n" for c in clients))
    return listing, victim.id, audio


@pytest.mark.parametrize("rounds, diverged", [
    ([([], ["a", "b"], {}), ([], ["c", "d"], {})], True),  # every client non-finite
    ([(["a"], ["b"], {}), ([], ["c", "d"], {})], True),  # short of min_clients only by non-finite clients
    ([([], ["a"], {"b": "Traceback"}), ([], ["c", "d"], {})], False),  # a client raised: a fault, not divergence
    ([([], ["a", "b"], {}), (["c"], [], {})], False),  # a round short for want of clients (a Poisson draw)
])
def test_only_rounds_lost_to_non_finite_clients_are_a_divergence(rounds, diverged):
    """fl_train's exit status 3 rests on RoundsFailedError.diverged: a fault (a client raised, too
    few sampled) must stay status 1, so that a study records only a real divergence as a result."""
    from fl_lib.fl.server import FailedRound, RoundsFailedError

    failures = [FailedRound(draw=d, used=used, dropped=dropped, failed=list(errors), errors=errors)
                for d, (used, dropped, errors) in enumerate(rounds)]
    assert RoundsFailedError(failures, 2).diverged is diverged


@pytest.mark.parametrize("min_clients", [1, 4])
def test_a_client_whose_audio_vanishes_between_rounds(fl_data, tmp_path, min_clients):
    """Counted as failed and named; the run goes on with the others (min 1) or stops naming it (min 4 of 4)."""
    import shutil

    from fl_lib.fl.server import RoundsFailedError

    listing, victim, audio = _vanishing_listing(tmp_path, fl_data)
    data, out = {**fl_data, "train_clients": listing}, tmp_path / "exp"
    conf = ["clients_per_round=4", f"min_clients_per_round={min_clients}", "max_failed_rounds=1"]
    run_inprocess(data, out, "fl_fedavg.yaml", ["rounds=1", *conf])
    assert victim in metrics(out)[0]["clients"]
    shutil.rmtree(audio)
    if min_clients == 1:
        run_inprocess(data, out, "fl_fedavg.yaml", ["rounds=2", *conf])
        row = metrics(out)[1]
        assert row["failed"] == [victim] and victim not in row["clients"] and len(row["clients"]) == 3
        assert row["always_failed"] == []  # it trained in round 1
    else:
        with pytest.raises(RoundsFailedError, match=rf"(?s)failed \['{victim}'\].*first traceback \(draw 2, client {victim}\)"):
            run_inprocess(data, out, "fl_fedavg.yaml", ["rounds=2", *conf])
        assert [r["round"] for r in metrics(out)] == [1]
