"""A Flower deployment on this machine: a SuperLink and N SuperNodes as separate processes.

Each SuperNode gets its own client index (`split_nodes`), so it can open only its own
clients' manifests; they talk to the SuperLink over Flower's transport on 127.0.0.1, as
devices would over the network. With `simulation`, the SuperLink runs Flower's simulation
engine instead, its N virtual nodes as Ray actors, node i reading node i's index. With
`resident_trainer`, each SuperNode runs under its node's resident trainer (`node_trainer.py`),
which imports ESPnet once instead of once per message. `flwr run` submits the app; the
deployment stops every process it started, also when the run fails or is interrupted.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from ..data.clients import load_clients

CONNECTION = "fl-lib-local"  # the SuperLink connection name in $FLWR_HOME/config.toml


def split_nodes(train_clients: Path, num_nodes: int, out_dir: Path) -> list[Path]:
    """`out_dir/node<i>/clients.jsonl`: client j (in id order) on node j mod N, manifests by absolute path."""
    clients = sorted(load_clients(train_clients), key=lambda c: c.id)
    if not 1 <= num_nodes <= len(clients):
        raise ValueError(f"{num_nodes} SuperNodes for {len(clients)} clients: give between 1 and {len(clients)}")
    for old in Path(out_dir).glob("node*/clients.jsonl"):  # a run before with more nodes
        if int(old.parent.name[len("node"):]) >= num_nodes:
            shutil.rmtree(old.parent)
    paths = []
    for i in range(num_nodes):
        index = Path(out_dir) / f"node{i}" / "clients.jsonl"
        index.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"id": c.id, "num_cuts": c.num_cuts, "duration": c.duration, "manifest": str(c.manifest.resolve())}
                for c in clients[i::num_nodes]]
        index.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(index)
    return paths


def write_app(app_dir: Path, run_config: dict) -> Path:
    """The Flower app `flwr run` submits: a pyproject naming fl_lib's ServerApp and ClientApp
    (imported from the installed fl_lib) and this experiment's run configuration."""
    app_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        '[build-system]', 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', '',
        '[project]', 'name = "fl-lib-app"', 'version = "1.0.0"', 'license = "Apache-2.0"', 'dependencies = []', '',
        '[tool.hatch.build.targets.wheel]', 'packages = ["."]', '',
        '[tool.flwr.app]', 'publisher = "fl-lib"', '',
        '[tool.flwr.app.components]', 'serverapp = "fl_lib.flower.server_app:app"', 'clientapp = "fl_lib.flower.client_app:app"', '',
        '[tool.flwr.app.config]',
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in run_config.items()]
    (app_dir / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return app_dir


def descendants(roots) -> set[int]:
    """Every live process below `roots`, by parent pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalDeployment:
    """`with LocalDeployment(work_dir, node_indexes) as d: d.run(app_dir)`.

    Processes are started in their own session, logs in `work_dir/logs/`, and stopped
    (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, work_dir: Path, node_indexes: Sequence[Path], simulation: bool = False, startup_timeout: float = 120.0,
                 resident_trainer: Optional[bool] = None) -> None:
        if resident_trainer is None:
            resident_trainer = not simulation
        if simulation and resident_trainer:
            raise ValueError("the simulation engine's nodes are Ray actors, which keep their imports: no resident trainer")
        self.work_dir = Path(work_dir)
        self.resident_trainer = resident_trainer
        self.sockets: Optional[Path] = None  # a short temporary directory: AF_UNIX paths hold 107 bytes
        self.node_indexes = list(node_indexes)
        self.simulation = simulation  # Flower's simulation engine (Ray) runs the nodes inside the SuperLink
        self.startup_timeout = startup_timeout
        self.home = self.work_dir / "flwr_home"
        self.logs = self.work_dir / "logs"
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        bin_dir = str(Path(sys.executable).parent)  # flower-superlink, flwr-serverapp, ... of this environment
        self.env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "FLWR_HOME": str(self.home),
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def _wait_listening(self, name: str, what: str, listening, deadline: float) -> None:
        """Until `listening()`; a clear error as soon as process `name` exits, or at `deadline` (the start-up timeout)."""
        while not listening():
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{what} exited at start-up: see {self.logs / (name + '.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} was not up within {self.startup_timeout:.0f} s: see {self.logs / (name + '.log')}")
            time.sleep(0.2)

    def _wait_port(self, port: int) -> None:
        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        self._wait_listening("superlink", f"the SuperLink (127.0.0.1:{port})", listening,
                             time.monotonic() + self.startup_timeout)

    def _wait_trainers(self) -> None:
        """Each node's resident trainer ready (ESPnet imported, its clients read; `node_trainer.ready_file`),
        or a clear error now rather than a server that waits its round timeout for nodes whose trainer died."""
        from .node_trainer import ready_file

        deadline = time.monotonic() + self.startup_timeout  # one start-up timeout for all nodes together
        for i in range(len(self.node_indexes)):
            self._wait_listening(f"supernode{i}", f"node {i}'s resident trainer", ready_file(self.sockets / f"node{i}.sock").exists,
                                 deadline)

    def __enter__(self) -> "LocalDeployment":
        shutil.rmtree(self.home, ignore_errors=True)
        self.home.mkdir(parents=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
        try:
            self._start("superlink", ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                                      "--host", "127.0.0.1", "--port", str(self.port)] + ["--simulation"] * self.simulation)
            self._wait_port(self.port)
            if self.resident_trainer:
                self.sockets = Path(tempfile.mkdtemp(prefix="fl_lib_nodes_"))
            for i, index in enumerate([] if self.simulation else self.node_indexes):
                index = Path(index).resolve()
                config = f'clients="{index}"'
                wrapper = []
                if self.resident_trainer:
                    sock = self.sockets / f"node{i}.sock"
                    config += f' trainer="{sock}"'
                    wrapper = [sys.executable, "-m", "fl_lib.flower.node_trainer", "--socket", str(sock), "--clients", str(index), "--"]
                self._start(f"supernode{i}", wrapper + ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                                                        "--port", str(free_port()), "--node-config", config])
            if self.resident_trainer:
                self._wait_trainers()
        except BaseException:
            self.close()
            raise
        return self

    def run(self, app_dir: Path) -> int:
        """`flwr run` of the app on this deployment, its output in logs/flwr_run.log; its exit status."""
        cmd = ["flwr", "run", str(app_dir), CONNECTION, "--stream"]
        if self.simulation:  # one CPU per ClientApp: as many in flight as this machine has cores
            cmd += ["--federation-config", f"num-supernodes={len(self.node_indexes)} client-resources-num-cpus=1 "
                                           f"client-resources-num-gpus=0.0 init-args-num-cpus={os.cpu_count()}"]
        with open(self.logs / "flwr_run.log", "a") as log:
            proc = subprocess.run(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return proc.returncode

    def _signal(self, name: str, sig: int) -> None:
        """`sig` to the process group of process `name` (the group outlives a dead leader)."""
        proc = self.procs.get(name)
        if proc is not None:
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self) -> None:
        """SIGTERM to every process this deployment started, their children included (the
        SuperLink starts its SuperExec, ServerApp and Ray in sessions of their own), then SIGKILL
        to whatever is left after 10 s."""
        started = [p.pid for p in self.procs.values()]
        family = set(started) | descendants(started)
        for name in self.procs:
            self._signal(name, signal.SIGTERM)
        for pid in family - set(started):
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for name in self.procs:
            self._signal(name, signal.SIGKILL)
        for pid in family | descendants(started):
            _kill(pid, signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait()
        if self.sockets is not None:
            shutil.rmtree(self.sockets, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.close()
