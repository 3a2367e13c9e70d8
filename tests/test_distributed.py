"""fl_train under torchrun: 2 gloo ranks on CPU against 1 process, a rank that fails, hangs or is
killed (and the resume after it), resume with another number of ranks, `--ngpu 1` without CUDA,
and the division of a round's clients.

Tolerance of 2 ranks against 1: max |Δw| ≤ 1e-5 over every weight, after each of 2 rounds.
Every client trains bitwise as in one process (seeded per client, from the same broadcast
weights); only the order of the float32 sums differs: each rank adds its own clients, all_reduce
adds the ranks' sums, and the log-sum-exp rescaling multiplies by exp(s_max,rank − s_max) first.
That is a few float32 roundings per entry (measured: 1.5e-8 after round 1). It is not bitwise.
The clients train with SGD here: with local Adam the first steps are ≈ lr·sign(g), so an entry
whose gradient is ~0 can flip by up to 2·lr on a 1e-8 difference (measured: 3.2e-4 after round 2
with the recipe's Adam at lr 2e-3): the optimizer amplifies, the reduction does not.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_fl_train import CONF_DIR, FAST, fl_train_argv, metrics, run_inprocess

TOLERANCE = 1e-5
DIST = ["rounds=2", "clients_per_round=3", "client.optim=sgd", "client.lr=0.05"]


def torchrun(nproc: int, argv: list[str], script=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node nproc -m fl_lib.bin.fl_train argv` (or a `script`)."""
    target = [str(script)] if script else ["-m", "fl_lib.bin.fl_train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *target, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def max_abs_diff(a: Path, b: Path) -> float:
    """max |Δw| over every entry of two saved state dicts."""
    x, y = torch.load(a), torch.load(b)
    assert x.keys() == y.keys()
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x if x[k].numel())


def test_assign_clients_balances_seconds_not_count():
    from fl_lib.fl.distributed import assign_clients

    ids, secs = ["a", "b", "c", "d", "e"], [30.0, 10.0, 10.0, 5.0, 5.0]
    shares = assign_clients(ids, secs, 2)
    assert shares == [["a"], ["b", "c", "d", "e"]]  # 30 s against 30 s, not 3 clients against 2
    assert assign_clients(["x", "y"], [1.0, 1.0], 3) == [["x"], ["y"], []]  # ties by id, then lower rank
    assert assign_clients(ids, secs, 1) == [ids]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_ngpu_without_cuda_is_a_clear_error(fl_data, tmp_path):
    from fl_lib.bin import decode, fl_train

    with pytest.raises(SystemExit, match=r"fl_train: --ngpu 1 asks for a GPU, but torch sees no CUDA device"):
        fl_train.main(fl_train_argv(fl_data, "fl_fedavg.yaml", tmp_path / "exp", extra=["--ngpu", "1"]))
    assert not (tmp_path / "exp").exists()  # stopped before anything ran, not on the CPU
    argv = ["--exp_dir", str(tmp_path), "--inference_config", str(CONF_DIR / "decode_asr_ctc.yaml"),
            "--cuts", str(fl_data["dev_cuts"]), "--output_dir", str(tmp_path / "dec"), "--ngpu", "1"]
    with pytest.raises(SystemExit, match=r"decode: --ngpu 1 asks for a GPU"):
        decode.main(argv)


# FedAvg's reduction is not run on its own: it is the strategies' shared weighted sum, which the DGA
# run (with its log-sum-exp rescaling) and the DP run (FedAvg, uniform weights) both take.
@pytest.mark.parametrize("conf_name, rule", [("fl_dga_sgd.yaml", []), ("fl_bmuf.yaml", []),
                                             ("fl_fedavg.yaml", ["strategy.name=median", "strategy.weight_by=null"]),
                                             ("fl_fedavg.yaml", ["strategy.weight_by=uniform", "privacy.clip=0.05",
                                                                 "privacy.noise_multiplier=0.5", "privacy.target_quantile=0.5",
                                                                 "privacy.count_noise=1.0"])],
                         ids=["dga", "bmuf", "median", "dp"])
def test_two_ranks_match_one_process(fl_data, tmp_path, conf_name, rule):
    """Same clients, weights and model within TOLERANCE; rank 0 trained only its share of each round.
    The median (a rule that needs every update at once) gathers the other ranks' updates on rank 0;
    under DP the noise is added once, on rank 0, not once per rank, and every rank bounds its
    clients by the clip that rank 0 adapted after round 1."""
    from fl_lib.data.clients import load_clients
    from fl_lib.fl.distributed import assign_clients

    one, two = tmp_path / "one", tmp_path / "two"
    run_inprocess(fl_data, one, conf_name, [*DIST, *rule])
    proc = torchrun(2, fl_train_argv(fl_data, conf_name, two, [*DIST, *rule]))
    assert proc.returncode == 0, proc.stderr[-5000:]
    m1, m2 = metrics(one), metrics(two)
    assert [r["clients"] for r in m1] == [r["clients"] for r in m2]
    assert [r["client_steps"] for r in m1] == [r["client_steps"] for r in m2]  # every rank's clients counted once
    for r1, r2 in zip(m1, m2):
        assert r2["weights"] == pytest.approx(r1["weights"], rel=1e-6)
    for name in ("1round.pth", "2round.pth"):
        assert max_abs_diff(one / name, two / name) <= TOLERANCE, name
    assert torch.load(one / "checkpoint.pth", weights_only=False)["round"] == torch.load(two / "checkpoint.pth", weights_only=False)["round"] == 2

    seconds = {c.id: c.duration for c in load_clients(fl_data["train_clients"])}
    rank0 = [cid for r in m2 for cid in assign_clients(r["clients"], [seconds[c] for c in r["clients"]], 2)[0]]
    logged = re.findall(r"round \d+: client (\S+): train_loss=", proc.stderr)  # rank 1 logs warnings only
    assert logged == rank0 and 0 < len(logged) < sum(len(r["clients"]) for r in m2)


def test_a_rank_that_raises_fails_the_job_with_its_error(fl_data, tmp_path):
    """Rank 1 raises in round 2 while rank 0 waits in a collective: non-zero exit, rank 1's message, no hang."""
    script = tmp_path / "rank1_fails.py"
    script.write_text(
        "import os\n"
        "from fl_lib.bin.fl_train import main\n"
        "from fl_lib.fl.server import FederatedServer\n"
        "run_round = FederatedServer.run_round\n"
        "def failing(self, draw):\n"
        "    if os.environ['RANK'] == '1' and draw == 1:\n"
        "        raise RuntimeError('rank 1 broke in round 2')\n"
        "    return run_round(self, draw)\n"
        "FederatedServer.run_round = failing\n"
        "main()\n"
    )
    t0 = time.monotonic()
    proc = torchrun(2, fl_train_argv(fl_data, "fl_fedavg.yaml", tmp_path / "exp", DIST, ["--dist_timeout", "60"]), script, timeout=300)
    assert proc.returncode != 0
    assert "rank 1 broke in round 2" in proc.stderr
    assert re.search(r"rank\s*:\s*1", proc.stderr), proc.stderr[-3000:]  # torchrun's report names the failing rank
    assert time.monotonic() - t0 < 300
    assert [r["round"] for r in metrics(tmp_path / "exp")] == [1]  # round 1 was recorded, round 2 never was


def test_a_rank_that_hangs_fails_the_job_within_the_collective_timeout(fl_data, tmp_path):
    """Rank 1 stops answering in round 2: rank 0's collective times out after --dist_timeout and the job fails."""
    script = tmp_path / "rank1_hangs.py"
    script.write_text(
        "import os, time\n"
        "from fl_lib.bin.fl_train import main\n"
        "from fl_lib.fl.server import FederatedServer\n"
        "run_round = FederatedServer.run_round\n"
        "def hanging(self, draw):\n"
        "    if os.environ['RANK'] == '1' and draw == 1:\n"
        "        time.sleep(3600)\n"
        "    return run_round(self, draw)\n"
        "FederatedServer.run_round = hanging\n"
        "main()\n"
    )
    argv = fl_train_argv(fl_data, "fl_fedavg.yaml", tmp_path / "exp", DIST, ["--dist_timeout", "20"])
    proc = torchrun(2, argv, script, timeout=400)  # a hang would end in subprocess.TimeoutExpired
    assert proc.returncode != 0
    assert re.search(r"rank\s*:\s*0", proc.stderr) and "timed out" in proc.stderr.lower(), proc.stderr[-3000:]


def test_a_rank_killed_mid_round_fails_the_job_within_the_timeout_and_the_resume_is_correct(fl_data, tmp_path):
    """SIGKILL to rank 1 once round 2's weights are broadcast, while rank 0 trains its share: the job
    fails within --dist_timeout of the kill, round 1 is checkpointed and round 2 is not, and
    rerunning the command finishes the run as an uninterrupted one (within the 2-against-1 tolerance)."""
    script = tmp_path / "rank1_killed.py"
    killed_at = tmp_path / "killed_at"
    script.write_text(
        "import os, signal, time\n"
        "from fl_lib.bin.fl_train import main\n"
        "from fl_lib.fl.server import FederatedServer\n"
        "round_start = FederatedServer._round_start\n"
        "def killed(self):\n"
        "    start = round_start(self)  # a collective: rank 0 has recorded round 1 and broadcast round 2's weights\n"
        "    if os.environ['RANK'] == '1' and self.draws == 1:\n"
        f"        open({str(killed_at)!r}, 'w').write(repr(time.time()))\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return start\n"
        "FederatedServer._round_start = killed\n"
        "main()\n"
    )
    timeout, out = 60, tmp_path / "exp"
    argv = fl_train_argv(fl_data, "fl_fedavg.yaml", out, DIST, ["--dist_timeout", str(timeout)])
    proc = torchrun(2, argv, script, timeout=400)
    ended = time.time()
    assert proc.returncode != 0 and killed_at.exists(), proc.stderr[-3000:]
    assert ended - float(killed_at.read_text()) < timeout, "the job outlived --dist_timeout after losing a rank"
    assert re.search(r"Signal 9 \(SIGKILL\)", proc.stderr), proc.stderr[-3000:]
    assert [r["round"] for r in metrics(out)] == [1]
    assert torch.load(out / "checkpoint.pth", weights_only=False)["round"] == 1

    resumed = torchrun(2, fl_train_argv(fl_data, "fl_fedavg.yaml", out, DIST))
    assert resumed.returncode == 0 and "1 of 2 rounds done" in resumed.stderr, resumed.stderr[-3000:]
    straight = tmp_path / "straight"
    run_inprocess(fl_data, straight, "fl_fedavg.yaml", DIST)
    assert [r["clients"] for r in metrics(out)] == [r["clients"] for r in metrics(straight)]
    assert max_abs_diff(straight / "latest.pth", out / "latest.pth") <= TOLERANCE


def test_two_ranks_resume_with_one(fl_data, tmp_path):
    """Round 1 with 2 ranks, round 2 resumed in one process: the model of an uninterrupted 1-process run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_inprocess(fl_data, straight, "fl_bmuf.yaml", DIST)  # BMUF: its block momentum must survive the resume
    proc = torchrun(2, fl_train_argv(fl_data, "fl_bmuf.yaml", resumed, [*DIST, "rounds=1"]))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert torch.load(resumed / "checkpoint.pth", weights_only=False)["round"] == 1
    run_inprocess(fl_data, resumed, "fl_bmuf.yaml", DIST)
    assert [r["clients"] for r in metrics(resumed)] == [r["clients"] for r in metrics(straight)]
    assert max_abs_diff(straight / "latest.pth", resumed / "latest.pth") <= TOLERANCE
    state = torch.load(resumed / "checkpoint.pth", weights_only=False)
    assert state["round"] == 2 and state["strategy"]["momentum_buffer"] is not None


def test_rl_dga_refuses_several_ranks(fl_data, tmp_path):
    """rl_dga's client scores need state only rank 0 keeps: several ranks are an error, before any collective."""
    from fl_lib.asr.model import build_asr_args, build_asr_model
    from fl_lib.data.clients import load_clients
    from fl_lib.fl.config import FLConfig
    from fl_lib.fl.distributed import Ranks
    from fl_lib.fl.executor import BatchSpec
    from fl_lib.fl.server import FederatedServer

    conf = FLConfig.from_yaml(CONF_DIR / "fl_rl_dga.yaml", FAST)
    args = build_asr_args(fl_data["asr_config"], fl_data["token_list"], fl_data["bpemodel"], fl_data["feats_stats"])
    batches = BatchSpec(fl_data["bpemodel"], fl_data["token_list"], 15.0, None)
    with pytest.raises(ValueError, match="strategy 'rl_dga' runs in one process only .* not with 2 ranks"):
        FederatedServer(build_asr_model(args), args, conf, load_clients(fl_data["train_clients"]), batches, None,
                        tmp_path, 7, ranks=Ranks(1, 2, 1))


def test_ranks_with_different_client_data_fail_at_start_up(fl_data, tmp_path):
    """Rank 1 reads a clients.jsonl whose first client's manifest lacks a cut: every rank stops before
    round 1 with an error naming that client, instead of training another split of each round."""
    import gzip
    import json
    import shutil

    from fl_lib.data.clients import load_clients

    clients = load_clients(fl_data["train_clients"])
    changed = tmp_path / "changed.jsonl.gz"
    shutil.copy(clients[0].manifest, changed)
    lines = gzip.open(changed, "rt").read().splitlines(keepends=True)
    with gzip.open(changed, "wt") as f:
        f.writelines(lines[:-1])
    other = tmp_path / "clients_rank1.jsonl"
    other.write_text("".join(
        json.dumps({"id": c.id, "num_cuts": c.num_cuts, "duration": c.duration,
                    "manifest": str(changed if c is clients[0] else c.manifest)}) + "\n" for c in clients))
    script = tmp_path / "rank1_other_clients.py"
    script.write_text(
        "import os, sys\n"
        "from fl_lib.bin.fl_train import main\n"
        "if os.environ['RANK'] == '1':\n"
        f"    sys.argv[sys.argv.index('--train_clients') + 1] = {str(other)!r}\n"
        "main()\n"
    )
    out = tmp_path / "exp"
    proc = torchrun(2, fl_train_argv(fl_data, "fl_fedavg.yaml", out, DIST, ["--dist_timeout", "60"]), script, timeout=300)
    assert proc.returncode != 0
    assert "the 2 torchrun ranks disagree on: client index" in proc.stderr, proc.stderr[-3000:]
    assert f"clients that differ (ids, num_cuts, duration or manifest content): ['{clients[0].id}']" in proc.stderr
    assert not (out / "metrics.jsonl").exists()


def test_merge_refuses_reports_that_miss_or_double_a_client():
    """Before aggregating, the ranks' used, dropped and failed clients must be the sample, each exactly once."""
    from fl_lib.fl.server import RoundCoverageError, _merge

    def report(used=(), dropped=(), failed=()):
        return (list(used), list(dropped), list(failed), {c: "Traceback" for c in failed},
                {c: 1.0 for c in used}, {c: (1, 0.1) for c in used})

    sampled = ["a", "b", "c", "d"]
    used, dropped, failed, errors, *_ = _merge([report(used=["c", "a"], failed=["d"]), report(dropped=["b"])], sampled)
    assert (used, dropped, failed, list(errors)) == (["a", "c"], ["b"], ["d"], ["d"])  # sampling order
    with pytest.raises(RoundCoverageError, match=r"never reported \['b'\], reported twice or more \(by ranks\) \{\}"):
        _merge([report(used=["a", "c"]), report(failed=["d"])], sampled)
    with pytest.raises(RoundCoverageError, match=r"never reported \[\], reported twice or more \(by ranks\) \{'c': \[0, 1\]\}"):
        _merge([report(used=["a", "c"], dropped=["b"]), report(used=["c"], failed=["d"])], sampled)
    with pytest.raises(RoundCoverageError, match=r"not sampled \['x'\]"):
        _merge([report(used=["a", "b", "c", "d"]), report(used=["x"])], sampled)
