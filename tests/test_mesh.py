"""End-to-end: real node processes over tcp loopback on real MNIST, checked against the reference.

Each mesh here is small (narrow layers, a few dozen batches) so the file runs in about a minute
on two cores; the timeouts are generous for a loaded machine.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import dni_mesh
from dni_mesh.build import build_source
from dni_mesh.launch import STOP_GRACE_S, NodeFailed, NodeStart, run
from dni_mesh.reference import ChainConfig, ChainTrainer
from dni_mesh.topology import load_topology
from dni_mesh.transport import free_port_range

# Resolved against the folder the tests run in: topology files written below pytest's temporary
# folder would resolve a relative data_dir against that folder instead.
DATA = Path(os.environ.get("DNI_MESH_DATA", Path(__file__).parents[2] / "shared" / "data")).resolve()
pytestmark = pytest.mark.skipif(not (DATA / "mnist").is_dir(),
                                reason=f"MNIST not found under {DATA} (set DNI_MESH_DATA)")

STEPS = 24


def chain(mode: str, **extra) -> dict:
    """source -> l1 -> l2 -> head on MNIST, one batch in flight."""
    topology = {
        "name": f"test-{mode}", "mode": mode, "seed": 3,
        "data": {"source": "mnist", "batch_size": 64, "epochs": 1, "eval_every": 0,
                 "limit": STEPS, "data_dir": str(DATA)},
        "defaults": {"optimizer": {"name": "adam", "lr": 1e-3}, "window": 1,
                     "synthetic_gradient": {"hidden": 0, "optimizer": {"name": "adam", "lr": 1e-3}}},
        "nodes": {"source": {"role": "source"},
                  "l1": {"module": "nodes.mlp:Block", "args": {"d_in": 784, "d_out": 32}},
                  "l2": {"module": "nodes.mlp:Block", "args": {"d_in": 32, "d_out": 32}},
                  "head": {"role": "head", "module": "nodes.mlp:Classifier",
                           "args": {"d_in": 32, "classes": 10}}},
        "edges": ["source -> l1", "l1 -> l2", "l2 -> head"],
        "hosts": {"local": {"address": "127.0.0.1", "base_port": free_port_range(16)}},
    }
    topology.update(extra)
    return topology


def write(tmp_path: Path, topology: dict) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    return path


def head_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "head.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("event") == "step"]


def reference_losses(path: Path) -> list[float]:
    topology = load_topology(path)
    torch.set_num_threads(1)
    trainer = ChainTrainer(ChainConfig.from_topology(topology))
    train = build_source(topology, "train")
    for step, (x, y) in enumerate(train.iterate(0)):
        if step == STEPS:
            break
        trainer.step(x, y)
    return trainer.losses


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode, target", [("backprop", "bootstrap"), ("cdni", "bootstrap"),
                                          ("dni", "backprop"), ("delayed", "bootstrap")])
def test_mesh_reproduces_reference(tmp_path, capsys, forkserver, mode, target):
    topology = chain(mode)
    topology["defaults"]["synthetic_gradient"]["target"] = target
    path = write(tmp_path, topology)
    summary = dni_mesh.run(path, run_dir=tmp_path / "run", quiet=True, forkserver=forkserver)
    assert capsys.readouterr().out == ""  # the Python API, asked to be quiet, prints nothing
    mesh = head_losses(tmp_path / "run")
    reference = reference_losses(path)
    assert len(mesh) == STEPS
    assert mesh == pytest.approx(reference, abs=1e-5)
    assert summary["mode"] == mode
    assert 0.0 < summary["test_accuracy"] <= 1.0
    nodes = summary["nodes"]
    assert set(nodes) == {"source", "l1", "l2", "head"}
    assert all(n["steps"] == STEPS and n["bad_messages"] == 0 and n["dropped_messages"] == 0
               for n in nodes.values())
    assert 0 < nodes["head"]["first_step_s"] == summary["first_step_s"] < summary["wall_s"]


@pytest.mark.timeout(240)
def test_dag_fan_out_and_fan_in(tmp_path):
    topology = chain("dni", nodes={
        "source": {"role": "source"},
        "l1": {"module": "nodes.mlp:Block", "args": {"d_in": 784, "d_out": 32}},
        "a": {"module": "nodes.mlp:Block", "args": {"d_in": 32, "d_out": 16}},
        "b": {"module": "nodes.mlp:Block", "args": {"d_in": 32, "d_out": 16}},
        "join": {"module": "nodes.mlp:Join", "args": {"d_in": [16, 16], "d_out": 32}},
        "head": {"role": "head", "module": "nodes.mlp:Classifier", "args": {"d_in": 32, "classes": 10}},
    }, edges=["source -> l1", "l1 -> a", "l1 -> b", "a -> join", "b -> join", "join -> head"])
    topology["defaults"]["window"] = 4
    # A fresh interpreter per node here (every other mesh of this file is forked).
    summary = run(write(tmp_path, topology), run_dir=tmp_path / "run", live=False,
                  start=NodeStart.EXEC)
    assert {n: v["steps"] for n, v in summary["nodes"].items()} == dict.fromkeys(summary["nodes"], STEPS)
    fits = [json.loads(line) for line in (tmp_path / "run" / "l1.jsonl").read_text().splitlines()]
    assert sum(r.get("event") == "fit" for r in fits) == STEPS  # one fit per step: both grads summed


MISBEHAVING = '''
import threading
from torch import nn

class Misbehave(nn.Module):
    """A node with a bug: on its fourth training step it raises, or blocks forever."""
    def __init__(self, d_in: int, d_out: int, how: str):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.how = how
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.training and self.calls > 3:
            if self.how == "raise":
                raise RuntimeError("boom in forward")
            threading.Event().wait()
        return self.linear(x)
'''


def misbehaving_chain(tmp_path: Path, how: str) -> Path:
    (tmp_path / "misbehaving.py").write_text(MISBEHAVING)
    topology = chain("dni")
    topology["nodes"]["l2"] = {"module": "misbehaving:Misbehave",
                               "args": {"d_in": 32, "d_out": 32, "how": how}}
    return write(tmp_path, topology)


@pytest.mark.timeout(120)
def test_dead_node_fails_the_run_with_its_name_and_output(tmp_path, forkserver):
    with pytest.raises(NodeFailed) as failure:
        run(misbehaving_chain(tmp_path, "raise"), run_dir=tmp_path / "run", live=False,
            forkserver=forkserver)
    text = str(failure.value)
    assert "node l2" in text and "boom in forward" in text
    pids = json.loads((tmp_path / "run" / "nodes.json").read_text())
    assert all(not alive(pid) for pid in pids.values())


@pytest.mark.timeout(120)
def test_hung_node_fails_the_run_by_its_silence(tmp_path, forkserver):
    started = time.monotonic()
    with pytest.raises(NodeFailed, match="node l2 .* sent no heartbeat or metrics for 10 s"):
        run(misbehaving_chain(tmp_path, "hang"), run_dir=tmp_path / "run", live=False, silence_s=10,
            forkserver=forkserver)
    assert time.monotonic() - started < 60
    pids = json.loads((tmp_path / "run" / "nodes.json").read_text())
    assert all(not alive(pid) for pid in pids.values())


@pytest.mark.timeout(120)
def test_a_stuck_mesh_fails_naming_each_node_and_what_it_waits_for(tmp_path):
    """l2 is frozen (SIGSTOP) mid-run: its peers keep heartbeating but cannot advance. The
    launcher fails the run by progress, not silence, naming the nodes and the edge and seq."""
    topology = chain("dni")
    topology["data"].update(epochs=50, limit=None)
    path = write(tmp_path, topology)
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "dni_mesh.cli", "run", str(path),
                                 "--run-dir", str(run_dir), "--no-live", "--stall-timeout", "5"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        head = run_dir / "head.jsonl"
        wait_for(lambda: head.exists() and '"event": "step"' in head.read_text(), 90, "training")
        pids = json.loads((run_dir / "nodes.json").read_text())
        os.kill(pids["l2"], signal.SIGSTOP)
        code = launcher.wait(timeout=60)
    finally:
        launcher.kill()
    text = launcher.stdout.read()
    assert code == 1, text
    assert "no node advanced for 5 s" in text
    assert re.search(r"node l1 \(pid \d+, progress \d+\) waits for the answer to seq \d+ on l1->l2", text), text
    assert re.search(r"node head .* waits for activation seq \d+ on l2->head", text), text
    assert all(not alive(pid) for pid in pids.values())


@pytest.mark.timeout(180)
def test_a_hand_started_mesh_exits_when_a_node_dies(tmp_path):
    """Nodes started as `dni-mesh node` with no launcher: kill -9 of l2 makes every other node
    exit non-zero within its stall timeout, having printed which neighbour it waits for."""
    topology = chain("dni")
    topology["data"].update(epochs=50, limit=None)
    path = write(tmp_path, topology)
    run_dir = tmp_path / "run"
    nodes = {name: subprocess.Popen([sys.executable, "-m", "dni_mesh.cli", "node", str(path),
                                     "--name", name, "--run-dir", str(run_dir),
                                     "--stall-timeout", "10"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in topology["nodes"]}
    try:
        head = run_dir / "head.jsonl"
        wait_for(lambda: head.exists() and '"event": "step"' in head.read_text(), 90, "training")
        nodes["l2"].kill()
        codes = {name: process.wait(timeout=90) for name, process in nodes.items() if name != "l2"}
    finally:
        for process in nodes.values():
            process.kill()
    output = {name: nodes[name].stdout.read() for name in codes}
    assert all(code == 1 for code in codes.values()), output
    expected = {"l1": r"the answer to seq \d+ on l1->l2 from l2",
                "head": r"activation seq \d+ on l2->head from l2",
                "source": r"the answer to seq \d+ on source->l1 from l1"}
    for name, waits in expected.items():
        assert re.search(r"node %s: ready, inbox tcp://" % name, output[name]), output[name]
        assert re.search(r"stalled: no progress for 10 s: waits for " + waits, output[name]), output[name]
    assert re.search(r"node head: step step=\d+ seq=\d+ samples_per_s=", output["head"]), output["head"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling a file the mesh writes, not synchronising with it


@pytest.mark.timeout(120)
def test_sigint_stops_every_node_within_the_grace_period(tmp_path):
    """Stop, then a kill after STOP_GRACE_S: the launcher is gone well within 15 s even on a
    loaded machine (a load average of 8 stretches the stop itself), and no node outlives it."""
    topology = chain("dni")
    topology["data"].update(epochs=50, limit=None)
    path = write(tmp_path, topology)
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "dni_mesh.cli", "run", str(path),
                                 "--run-dir", str(run_dir), "--no-live"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        head = run_dir / "head.jsonl"
        wait_for(lambda: head.exists() and '"event": "step"' in head.read_text(), 90, "training")
        pids = json.loads((run_dir / "nodes.json").read_text())
        launcher.send_signal(signal.SIGINT)
        started = time.monotonic()
        code = launcher.wait(timeout=30)
        assert time.monotonic() - started < STOP_GRACE_S + 12
    finally:
        launcher.kill()
    assert code == 130, launcher.stdout.read()
    assert all(not alive(pid) for pid in pids.values())


@pytest.mark.parametrize("problem, expected", [
    ({"edges": ["source -> l1", "l1 -> nowhere"]}, "nowhere"),
    ({"data": {"batch_size": "many"}}, "batch_size"),
])
def test_invalid_topology_exits_2_before_starting(tmp_path, problem, expected):
    topology = chain("dni")
    for key, value in problem.items():
        topology[key] = {**topology[key], **value} if isinstance(value, dict) else value
    path = write(tmp_path, topology)
    result = subprocess.run([sys.executable, "-m", "dni_mesh.cli", "run", str(path),
                             "--run-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert str(path) in result.stderr and expected in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_busy_port_exits_2_naming_the_node_and_the_key_to_change(tmp_path):
    topology = chain("dni")
    base = topology["hosts"]["local"]["base_port"]
    path = write(tmp_path, topology)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base + 1))  # l1's port (file order: source, l1, ...)
        result = subprocess.run([sys.executable, "-m", "dni_mesh.cli", "run", str(path), "--no-live",
                                 "--run-dir", str(tmp_path / "run")],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"node l1: port {base + 1} on 127.0.0.1 is in use" in result.stderr
    assert "--set 'hosts.local={address: 127.0.0.1, base_port: " in result.stderr
    assert "nodes.l1.port" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_hand_started_node_on_a_busy_port_exits_2_naming_the_keys(tmp_path):
    topology = chain("dni")
    base = topology["hosts"]["local"]["base_port"]
    path = write(tmp_path, topology)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base))  # the source's port
        squatter.listen()
        result = subprocess.run([sys.executable, "-m", "dni_mesh.cli", "node", str(path), "--name",
                                 "source", "--run-dir", str(tmp_path / "run")],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"node source: inbox 'source' cannot bind tcp://127.0.0.1:{base}" in result.stderr
    assert "--set nodes.source.port=N" in result.stderr and "Traceback" not in result.stderr
