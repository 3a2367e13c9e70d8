"""fl_lib over Flower: the wire format, the server's checks on replies, and a real
SuperLink with two SuperNodes giving the native loop's model bitwise."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_lib.fl.config import FLConfig
from fl_lib.fl.executor import Task
from fl_lib.fl.strategies.base import ClientResult
from fl_lib.flower.records import ClientSetup, MalformedUpdate, read_result, read_task, result_content, task_content
from fl_lib.flower.deployment import descendants
from fl_lib.flower.federation import FlowerClients, FlowerFederation

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "egs/librispeech_fl/conf"
SETUP = ClientSetup(espnet_config={"token_list": ["<blank>", "a"]}, client={"lr": 0.1}, batches={"max_duration": 15.0},
                    files={"bpemodel": b"\x00model", "token_list": b"<blank>\na\n"}, seed=3, num_threads=1)


@pytest.fixture
def task_identity():
    """Instruction messages need the identity a running ServerApp has."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _state(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"enc.weight": torch.randn(4, 3, generator=g), "enc.bias": torch.randn(4, generator=g),
            "norm.count": torch.tensor(5, dtype=torch.long)}


def _result(cid: str, delta: dict) -> ClientResult:
    return ClientResult(client_id=cid, delta=delta, num_utts=6, num_frames=812, train_loss=1 / 3, grad_mean=-1e-7,
                        grad_rms=math.pi, grad_var=2.5e-3, num_steps=2, seconds=1.25, cpu_seconds=1.5, num_tokens=97)


def test_task_and_result_cross_the_wire_bitwise():
    start = _state()
    cid, got, draw, mu, lr_scale, setup = read_task(task_content(Task("1089", Path("m"), start, 7, 0.01, 0.98), SETUP))
    assert (cid, draw, mu, lr_scale, setup) == ("1089", 7, 0.01, 0.98, SETUP)
    assert got.keys() == start.keys() and all(torch.equal(got[k], start[k]) and got[k].dtype == start[k].dtype for k in start)
    delta = {k: v for k, v in _state(1).items() if v.is_floating_point()}
    sent = _result("1089", delta)
    back = read_result(result_content(sent), "1089", start)
    assert all(torch.equal(back.delta[k], delta[k]) for k in delta)
    assert {k: v for k, v in back.__dict__.items() if k != "delta"} == {k: v for k, v in sent.__dict__.items() if k != "delta"}


@pytest.mark.parametrize("corrupt,reason", [
    (lambda d: d.update({"enc.bias": torch.zeros(5)}), r"Δ\[enc.bias\] is \(5,\)"),
    (lambda d: d.pop("enc.bias"), "missing entries \\['enc.bias'\\]"),
    (lambda d: d.update({"extra": torch.zeros(1)}), "unknown entries \\['extra'\\]"),
    (lambda d: d.update({"enc.bias": torch.zeros(4, dtype=torch.float64)}), "torch.float64"),
])
def test_a_malformed_update_is_refused_with_its_reason(corrupt, reason):
    delta = {k: v for k, v in _state(1).items() if v.is_floating_point()}
    corrupt(delta)
    with pytest.raises(MalformedUpdate, match=reason):
        read_result(result_content(_result("1089", delta)), "1089", _state())
    with pytest.raises(MalformedUpdate, match="for client '7'"):
        read_result(result_content(_result("7", {k: v for k, v in _state(1).items() if v.is_floating_point()})), "1089", _state())


@pytest.mark.parametrize("corrupt,reason", [
    (lambda c: c.metric_records["metrics"].__setitem__("num_utts", -3), "negative counts"),
    (lambda c: c.metric_records["metrics"].__setitem__("train_loss", [1.0, 2.0]), "not numbers: \\['train_loss'\\]"),
    (lambda c: c.metric_records["metrics"].__delitem__("grad_rms"), "lacks the statistics \\['grad_rms'\\]"),
    (lambda c: c.__delitem__("delta"), "lacks the record 'delta'"),
])
def test_a_reply_with_bad_statistics_or_records_is_refused(corrupt, reason):
    content = result_content(_result("1089", {k: v for k, v in _state(1).items() if v.is_floating_point()}))
    corrupt(content)
    with pytest.raises(MalformedUpdate, match=reason):
        read_result(content, "1089", _state())


def test_a_non_finite_update_is_flagged_whatever_the_client_says():
    delta = {k: v for k, v in _state(1).items() if v.is_floating_point()}
    delta["enc.weight"][2, 1] = math.nan
    sent = _result("1089", delta)
    assert sent.delta_finite  # the client claims a finite Δ
    assert not read_result(result_content(sent), "1089", _state()).is_finite()


class FakeGrid:
    """A Grid whose nodes answer by `behaviour[client id]`: the server's side, without processes.
    Replies arrive one per pull, the last pushed first: never in sampling order."""

    def __init__(self, online, behaviour) -> None:
        self.online, self.behaviour, self.pushed = online, behaviour, []

    def get_node_ids(self):
        return list(self.online)

    def push_messages(self, msgs):
        ids = []
        for m in msgs:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.pushed.append(m)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        for m in reversed([m for m in self.pushed if m.metadata.message_id in ids]):
            self.pushed.remove(m)
            task = read_task(m.content)
            reply = self.behaviour[task.client_id](m, task.start)
            if reply is not None:
                return [reply]
        return []


def test_the_server_turns_each_bad_reply_into_a_failed_client_with_its_reason(task_identity):
    trained = ["enc.weight", "enc.bias"]  # the start's "front.melmat" is a constant: no client may send a Δ for it

    def good(m, start):
        return Message(result_content(_result("a", {k: start[k] + 1 for k in trained})), reply_to=m)

    def moves_a_constant(m, start):
        return Message(result_content(_result("f", {k: v + 1 for k, v in start.items() if v.is_floating_point()})), reply_to=m)

    misshapen = {"enc.weight": torch.zeros(4, 3), "enc.bias": torch.zeros(3)}

    def wrong_shape(m, start):
        return Message(result_content(_result("b", misshapen)), reply_to=m)

    behaviour = {"a": good, "b": wrong_shape, "c": lambda m, s: Message(Error(0, "ClientApp raised: boom"), reply_to=m),
                 "d": lambda m, s: None, "e": good, "f": moves_a_constant}
    node_of = {"a": 1, "b": 1, "c": 2, "d": 2, "e": 3, "f": 1}
    grid = FakeGrid(online=[1, 2], behaviour=behaviour)
    fed = FlowerFederation(grid, node_of, clients=[], digests={}, round_timeout=1.0, poll_seconds=0.01)
    start = {**_state(), "front.melmat": torch.ones(2)}
    tasks = [Task(cid, Path(cid), start, 0, 0.0) for cid in "fedcba"]
    outcomes = list(FlowerClients(fed, SETUP, trained).map(tasks))
    assert [o.client_id for o in outcomes] == list("fedcba")  # sampling order, whatever the arrival order
    by = {o.client_id: o for o in outcomes}
    assert torch.equal(by["a"].result.delta["enc.weight"], start["enc.weight"] + 1) and by["a"].error is None
    assert "SuperNode 3 holding client e is not connected" in by["e"].error
    assert "no reply from SuperNode 2 within the round timeout of 1 s" in by["d"].error
    assert "boom" in by["c"].error
    assert "update rejected" in by["b"].error and "Δ[enc.bias] is (3,)" in by["b"].error
    assert "update rejected" in by["f"].error and "unknown entries ['front.melmat']" in by["f"].error
    moved = ArrayRecord({k: v for k, v in start.items() if v.is_floating_point()}).count_bytes()
    assert fed.bytes_per_draw == {0: {"sent": 5 * ArrayRecord(start).count_bytes(),  # the weights to the 5 connected clients' nodes
                                      "received": ArrayRecord(by["a"].result.delta).count_bytes() + ArrayRecord(misshapen).count_bytes()
                                      + moved}}


def test_a_node_trains_only_the_clients_in_its_own_index(fl_data, tmp_path, task_identity):
    from fl_lib.data.clients import load_clients
    from fl_lib.flower import client_app
    from fl_lib.flower.deployment import split_nodes

    indexes = split_nodes(fl_data["train_clients"], 2, tmp_path)
    held = [[c.id for c in load_clients(i)] for i in indexes]
    everyone = sorted(c.id for c in load_clients(fl_data["train_clients"]))
    assert sorted(held[0] + held[1]) == everyone and not set(held[0]) & set(held[1])
    context = Context(run_id=1, node_id=1, node_config={"clients": str(indexes[0])}, state=RecordDict(), run_config={})
    msg = Message(task_content(Task(held[1][0], Path("x"), _state(), 0, 0.0), SETUP), dst_node_id=1, message_type=MessageType.TRAIN)
    with pytest.raises(ValueError, match=f"client {held[1][0]} is not held by this node"):
        client_app.train(msg, context)
    query = Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY)
    rows = json.loads(client_app.query(query, context).content.config_records["index"]["clients"])
    assert [r["id"] for r in rows] == held[0]


def test_the_resident_trainer_answers_over_its_socket_and_returns_a_task_s_failure(fl_data, tmp_path, task_identity):
    """node_trainer.py's wire: a request answered by the node's own training code (here it refuses a
    client of the other node), the failure's traceback back to the ClientApp as NodeTrainerError."""
    import threading

    from fl_lib.data.clients import load_clients
    from fl_lib.flower import client_app
    from fl_lib.flower.deployment import split_nodes
    from fl_lib.flower.node_trainer import NodeTrainerError, ResidentTrainer, listen, request

    indexes = split_nodes(fl_data["train_clients"], 2, tmp_path)
    other = load_clients(indexes[1])[0].id
    sock = tmp_path / "n.sock"
    listener = listen(sock)
    server = threading.Thread(target=ResidentTrainer(indexes[0]).serve, args=(listener,), daemon=True)
    server.start()
    content = task_content(Task(other, Path("x"), _state(), 0, 0.0), SETUP)
    with pytest.raises(NodeTrainerError, match=f"(?s)Traceback.*client {other} is not held by this node"):
        request(sock, content, timeout=60)
    context = Context(run_id=1, node_id=1, node_config={"clients": str(indexes[0]), "trainer": str(sock)},
                      state=RecordDict(), run_config={})
    msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    with pytest.raises(NodeTrainerError, match="is not held by this node"):  # the ClientApp's train hands it over
        client_app.train(msg, context)
    listener.close()
    server.join(5)
    with pytest.raises(NodeTrainerError, match="is not reachable"):
        request(sock, content, timeout=5)


# A resident ClientApp in a process of its own, against a stand-in trainer that echoes the request:
# what it imports while it trains, and how long it waits for a trainer that never replies.
_RESIDENT_CLIENT_APP = """
import socket, sys, threading, time
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fl_lib.flower import client_app, node_trainer

sock, reply = sys.argv[1], sys.argv[2] == "echo"
listener = node_trainer.listen(sock)

def stand_in():
    conn, _ = listener.accept()
    data = node_trainer._recv_frame(conn)
    if reply:
        conn.sendall(node_trainer.OK)
        node_trainer._send_frame(conn, data)
    else:
        time.sleep(60)

threading.Thread(target=stand_in, daemon=True).start()
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
content = RecordDict({"task": ConfigRecord({"client-id": "spk1"})})
msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN, ttl=3)
context = Context(run_id=1, node_id=1, node_config={"trainer": sock}, state=RecordDict(), run_config={})
try:
    out = client_app.train(msg, context)
    print(out.content.config_records["task"]["client-id"], "torch" in sys.modules)
except node_trainer.NodeTrainerError as e:
    print(e)
"""


@pytest.mark.parametrize("trainer", ["echo", "silent"])
def test_a_resident_client_app_never_imports_torch_and_waits_no_longer_than_its_message_lives(tmp_path, trainer):
    out = subprocess.run([sys.executable, "-c", _RESIDENT_CLIENT_APP, str(tmp_path / "n.sock"), trainer], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=50)
    if trainer == "echo":  # the reply is the trainer's, and the ClientApp's process trained without torch
        assert out.stdout.strip() == "spk1 False", out.stdout + out.stderr
    else:  # the message's TTL is 3 s: the ClientApp gives up then, not after the stand-in's 60 s
        assert "did not reply within 3 s" in out.stdout, out.stdout + out.stderr


def test_the_resident_trainer_skips_a_task_its_client_app_left_and_survives_a_system_exit(tmp_path, task_identity):
    """A request waits in the backlog before the trainer serves, and its ClientApp has gone (it timed
    out): that task is never trained. Of two more, one's training exits (ESPnet's parsers call
    sys.exit on a bad option), which its ClientApp gets as an error; the other is still trained."""
    import socket
    import threading

    from fl_lib.flower.node_trainer import NodeTrainerError, ResidentTrainer, _send_frame, listen, request, to_bytes

    class Recording(ResidentTrainer):
        def __init__(self):
            self.trained = []

        def handle(self, content):
            client = content.config_records["task"]["client-id"]
            self.trained.append(client)
            if client == "exits":
                raise SystemExit(2)
            return content

    def content(client):
        from flwr.app import ConfigRecord
        return RecordDict({"task": ConfigRecord({"client-id": client})})

    sock = tmp_path / "n.sock"
    listener = listen(sock)
    gone = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    gone.connect(str(sock))
    _send_frame(gone, to_bytes(content("left")))
    gone.close()
    replies = {}

    def client(name):
        try:
            replies[name] = request(sock, content(name), timeout=30).config_records["task"]["client-id"]
        except NodeTrainerError as e:
            replies[name] = str(e)

    asking = [threading.Thread(target=client, args=(name,)) for name in ("exits", "stays")]
    for t in asking:
        t.start()
    trainer = Recording()
    threading.Thread(target=trainer.serve, args=(listener,), daemon=True).start()
    for t in asking:
        t.join(30)
    listener.close()
    assert sorted(trainer.trained) == ["exits", "stays"]  # not "left"
    assert "SystemExit: 2" in replies["exits"] and replies["stays"] == "stays"


def test_a_supernode_dies_with_its_resident_trainer(fl_data, tmp_path):
    """The trainer is SIGKILLed (no clean-up of its own runs) while it imports ESPnet: its node,
    here a stand-in `sleep`, is killed with it rather than left serving tasks that all fail."""
    import signal
    import time

    sock = tmp_path / "n.sock"
    trainer = subprocess.Popen([sys.executable, "-m", "fl_lib.flower.node_trainer", "--socket", str(sock), "--clients",
                                str(fl_data["train_clients"]), "--", "sleep", "300"], env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while not (sock.exists() and _pids("-P", str(trainer.pid))) and time.monotonic() < deadline:
        time.sleep(0.05)
    node = _pids("-P", str(trainer.pid))
    assert sock.exists() and len(node) == 1 and trainer.poll() is None
    trainer.send_signal(signal.SIGKILL)
    trainer.wait(10)
    while node[0] in _pids("-f", "^sleep 300$") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node[0] not in _pids("-f", "^sleep 300$")


def test_a_resident_trainer_that_fails_at_start_up_fails_the_deployment_at_once(tmp_path):
    """Its socket listens before ESPnet is imported and the clients are read: the deployment waits
    for the trainer's ready file, so a trainer that dies there is an error of the launch, not a
    run whose server waits out its round timeout for replies that never come."""
    from fl_lib.flower.deployment import LocalDeployment

    index = tmp_path / "clients.jsonl"
    index.write_text("not a client record\n")
    with pytest.raises(RuntimeError, match="node 0's resident trainer exited at start-up"):
        with LocalDeployment(tmp_path / "work", [index], startup_timeout=120):
            pass
    assert f"{index}:1 is not a client record" in (tmp_path / "work" / "logs" / "supernode0.log").read_text()


def _flower_train(fl_data, out: Path, conf: str, overrides, round_timeout=600, engine="grpc") -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "fl_lib.bin.flower_train", "--nodes", "2", "--seed", "7", "--output_dir", str(out),
            "--fl_config", str(CONF_DIR / conf), "--round_timeout", str(round_timeout), "--engine", engine]
    for key in ("asr_config", "train_clients", "token_list", "bpemodel", "feats_stats"):
        args += [f"--{key}", str(fl_data[key])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([*args, *overrides], env=env, capture_output=True, text=True)


# Each pairing of {FedAvg, DGA} x {grpc, simulation} passed on 2026-12-04 (before the resident trainer); CI runs
# two of them, each deployment costing a SuperLink, SuperNodes and their resident trainers' ESPnet imports.
@pytest.mark.parametrize("conf,engine", [("fl_fedavg.yaml", "grpc"), ("fl_dga_sgd.yaml", "simulation")])
def test_flower_trains_the_native_model_bitwise_and_resumes(fl_data, tmp_path, conf, engine):
    """Two SuperNodes behind a real SuperLink (grpc: separate processes; simulation: Flower's
    engine), client SGD: 2 rounds give the native loop's global model bit for bit and the
    same client sample per round. FedAvg stops after round 1 and a restarted server
    finishes the second from its checkpoint."""
    from fl_lib.fl.train import train

    overrides = ["clients_per_round=2", "client.max_steps=2", "client.max_duration=15", "client.optim=sgd", "client.lr=0.05"]
    data = {k: v for k, v in fl_data.items() if k != "dev_cuts"}
    native = tmp_path / "native"
    train(FLConfig.from_yaml(CONF_DIR / conf, [*overrides, "rounds=2"]), output_dir=native, seed=7, **data)
    out = tmp_path / "flower"
    stops = (1, 2) if conf == "fl_fedavg.yaml" else (2,)
    for rounds in stops:
        proc = _flower_train(fl_data, out, conf, [*overrides, f"rounds={rounds}"], engine=engine)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if len(stops) == 2:
        assert "resumed from" in (out / "flower_server.log").read_text()
    a, b = (torch.load(d / "latest.pth", map_location="cpu") for d in (native, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (native, out)]
    assert [r["clients"] for r in rows[0]] == [r["clients"] for r in rows[1]] and len(rows[1]) == 2
    status = json.loads((out / "flower_status.json").read_text())
    assert status["status"] == "finished" and status["rounds"] == 2
    last_run = range(stops[0], 2) if len(stops) == 2 else range(2)  # draws the last ServerApp sent
    assert sorted(map(int, status["bytes_per_draw"])) == list(last_run)
    assert all(b["sent"] > 0 and b["received"] > 0 for b in status["bytes_per_draw"].values())
    if engine == "grpc":  # the nodes' resident trainers trained every client, not per-message ClientApp processes
        logs = "".join((out / f"flower/logs/supernode{i}.log").read_text() for i in range(2))
        assert logs.count("trained client ") == 2 * len(last_run), logs[-3000:]  # 2 clients a round, last run's logs


def _pids(*pgrep_args) -> list[int]:
    proc = subprocess.run(["pgrep", *pgrep_args], capture_output=True, text=True)
    return [int(p) for p in proc.stdout.split()]


def test_a_supernode_killed_mid_round_fails_its_clients_and_the_run_goes_on(fl_data, tmp_path):
    """SuperNode 1 is killed (SIGKILL, its ClientApp with it) while it trains a client of round 1.
    Its two clients fail with the reason the transport gives; node 0's two keep each round above
    min_clients_per_round, so both rounds count and the job ends instead of hanging."""
    import signal
    import threading
    import time

    out = tmp_path / "flower"
    killed = {}

    def kill_node1_mid_round():
        deadline = time.monotonic() + 600
        log = out / "flower_server.log"
        while time.monotonic() < deadline and not (log.exists() and "federation:" in log.read_text()):
            time.sleep(0.2)
        while time.monotonic() < deadline:
            for pid in _pids("-f", f"{out}/flower/node1/clients.jsonl"):
                if set(_pids("-f", "flwr-clientapp")) & descendants([pid]):  # a train message is in flight there
                    os.killpg(os.getpgid(pid), signal.SIGKILL)  # the node's group: its trainer, SuperNode and ClientApp
                    metrics = out / "metrics.jsonl"
                    killed["round"] = 1 + (len(metrics.read_text().splitlines()) if metrics.exists() else 0)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_node1_mid_round, daemon=True)
    killer.start()
    proc = _flower_train(fl_data, out, "fl_fedavg.yaml", ["rounds=2", "clients_per_round=4", "min_clients_per_round=2",
                                                           "client.max_steps=1", "client.max_duration=15"], round_timeout=120)
    killer.join()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert killed == {"round": 1}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    node1 = sorted(c["id"] for c in map(json.loads, (out / "flower/node1/clients.jsonl").read_text().splitlines()))
    assert [r["round"] for r in rows] == [1, 2]
    assert sorted(rows[0]["failed"]) == node1 and sorted(rows[1]["failed"]) == node1
    assert not set(rows[0]["clients"]) & set(node1) and len(rows[0]["clients"]) == 2
    log = (out / "flower_server.log").read_text()
    round2 = log.split("round 1/2:", 1)[1]
    for cid in node1:  # the SuperLink's reason, or the round timeout's if it came first
        failure = log.split(f"round 1: client {cid} failed; the round goes on without it\n", 1)[1].split("\n", 1)[0]
        assert "Node Unavailable" in failure or "within the round timeout" in failure, failure
    assert all(f"holding client {cid} is not connected" in round2 for cid in node1)  # round 2 does not wait for them

