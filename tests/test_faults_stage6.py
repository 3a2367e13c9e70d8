"""Faults injected into stage 6 (averaging and decoding): damaged and malicious model files, a full
disk while averaging or writing a decode directory, SIGTERM mid-decode with worker processes.
"""
from __future__ import annotations

import errno
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_faults import Plant, _damage, _fail_with

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def exp_copy(tiny_exp, tmp_path):
    """A private copy of the tiny experiment (stage 6 writes averaged models into it) and its cuts,
    without the averages other tests wrote into the shared one."""
    import shutil

    exp, cuts = tiny_exp
    return Path(shutil.copytree(exp, tmp_path / "exp", ignore=shutil.ignore_patterns("valid.acc.ave*"))), cuts


def decode_cli(exp: Path, model: str, cuts: Path, out: Path, *more, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fl_lib.bin.decode", "--exp_dir", exp, "--model", model, "--cuts", cuts,
           "--inference_config", REPO / "egs/librispeech_fl/conf/decode_asr_ctc.yaml", "--output_dir", out, *more]
    return subprocess.Popen([str(a) for a in cmd], cwd=REPO, text=True, **popen)


@pytest.mark.parametrize("damaged", ["2round.pth", "valid.acc.best.pth"])
def test_stage6_names_a_damaged_model_file_before_decoding(exp_copy, tmp_path, damaged):
    """A damaged round checkpoint (averaged) or model (decoded as is): decode exits 1 naming the file,
    before any worker starts, and the average already on disk stays as it was."""
    from fl_lib.asr.average import resolve_model
    from fl_lib.fl.checkpoint import CheckpointError

    exp, cuts = exp_copy
    model = "valid.acc.ave" if damaged.endswith("round.pth") else "best"
    average = resolve_model(exp, "valid.acc.ave").read_bytes()
    _damage(exp / damaged, "truncated")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(exp / damaged))}: unreadable, truncated or corrupted"):
        resolve_model(exp, model)
    proc = decode_cli(exp, model, cuts, tmp_path / "dec", stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and err.strip().splitlines()[-1].startswith(f"decode: {exp / damaged}: unreadable")
    assert "worker ready" not in err and not (tmp_path / "dec/score.json").exists()
    assert (exp / "valid.acc.ave.pth").read_bytes() == average and not list(exp.glob(".tmp*"))


def test_stage6_refuses_a_malicious_model_and_never_runs_it(exp_copy, tmp_path):
    exp, cuts = exp_copy
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(1), "payload": Plant(marker)}, exp / "valid.acc.best.pth")
    proc = decode_cli(exp, "best", cuts, tmp_path / "dec", stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and f"decode: {exp / 'valid.acc.best.pth'}: refused, it is not loaded" in err
    assert not marker.exists()


def test_enospc_while_writing_stage6_outputs_leaves_the_old_files_and_no_score(exp_copy, tmp_path, monkeypatch):
    """A full disk while averaging keeps the previous average; while writing the decode dir it leaves
    no score.json (RESULTS.md reads it) and no half file; the rerun scores as the first decode did."""
    import fl_lib.asr.average
    import fl_lib.asr.decode
    from fl_lib.asr.decode import decode_cuts

    exp, cuts = exp_copy
    conf, out = REPO / "egs/librispeech_fl/conf/decode_asr_ctc.yaml", tmp_path / "dec"
    first = decode_cuts(exp, "valid.acc.ave", conf, cuts, out)
    average, hyp = (exp / "valid.acc.ave.pth").read_bytes(), (out / "hyp.trn").read_bytes()

    def disk_full(*args, **kwargs):
        Path(args[1]).write_bytes(b"PK\x03\x04 half a file")
        raise _fail_with(errno.ENOSPC)

    monkeypatch.setattr(fl_lib.asr.average.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        decode_cuts(exp, "valid.acc.ave_2best.pth", conf, cuts, out)
    with pytest.raises(OSError, match="No space left on device"):
        decode_cuts(exp, "valid.acc.ave", conf, cuts, out)
    monkeypatch.undo()
    assert (exp / "valid.acc.ave.pth").read_bytes() == average and not (exp / "valid.acc.ave_2best.pth").exists()

    write_trn = fl_lib.asr.decode.scoring.write_trn

    def hyp_disk_full(path, texts, *rest):
        if not Path(path).name.endswith("hyp.trn"):
            return write_trn(path, texts, *rest)
        Path(path).write_text(texts[0])
        raise _fail_with(errno.ENOSPC)

    monkeypatch.setattr(fl_lib.asr.decode.scoring, "write_trn", hyp_disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        decode_cuts(exp, "valid.acc.ave", conf, cuts, out)
    monkeypatch.undo()
    assert not (out / "score.json").exists() and (out / "hyp.trn").read_bytes() == hyp
    assert not list(exp.glob(".tmp*")) and not list(out.glob(".tmp*"))
    again = decode_cuts(exp, "valid.acc.ave", conf, cuts, out)
    assert again["wer"] == first["wer"] and json.loads((out / "score.json").read_text())["wer"] == first["wer"]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while listing
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_during_stage6_stops_the_workers_and_leaves_no_score(exp_copy, tmp_path):
    """SIGTERM mid-decode (nj 2): exit 143 with a message, both decoding workers gone (not orphaned,
    waiting for work forever), no score.json (an earlier decode's is gone too) and no temporary
    file; the rerun decodes everything."""
    from lhotse import CutSet, load_manifest

    exp, cuts = exp_copy
    many = tmp_path / "many.jsonl.gz"  # long enough to be caught mid-way
    CutSet.from_cuts(c.with_id(f"{c.id}-{i}") for i in range(50) for c in load_manifest(cuts)).to_file(many)
    out, log = tmp_path / "dec", tmp_path / "decode.log"
    out.mkdir()
    (out / "score.json").write_text('{"wer": "of an earlier decode"}')  # must not stand for the stopped one
    with open(log, "w") as stderr:
        proc = decode_cli(exp, "best", many, out, "--nj", "2", stderr=stderr)
        deadline = time.monotonic() + 240
        while not re.search(r"\b([1-9]\d*)/200\b", log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        workers = [k for k in _children(proc.pid) if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text()]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    assert len(workers) == 2
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "decoding workers outlived their parent"
    text = log.read_text()
    assert "decode: stopped by SIGTERM" in text and "Traceback" not in text
    assert not (out / "score.json").exists() and not list(out.glob(".tmp*")) and not list(exp.glob(".tmp*"))
    proc = decode_cli(exp, "best", many, out, "--nj", "2", stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=600) == 0 and json.loads((out / "score.json").read_text())["num_utts"] == 200
