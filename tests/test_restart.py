"""A node that dies is restarted by the launcher (the topology's `restart: {max: N}`) and rejoins
the running mesh while its peers keep learning: end to end with real processes and `kill -9`
of a middle stage, the head and the source; the launcher's bookkeeping of an outage without
processes; the policy as the topology file states it; and a node that keeps dying past its
policy failing the run."""

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

import dni_mesh
from dni_mesh import wire
from dni_mesh.launch import Launcher, NodeFailed, NodeProcess, run
from dni_mesh.topology import TopologyError, load_topology
from test_mesh import DATA, chain, misbehaving_chain, wait_for, write

pytestmark = pytest.mark.skipif(not (DATA / "mnist").is_dir(),
                                reason=f"MNIST not found under {DATA} (set DNI_MESH_DATA)")


def restarting_chain() -> dict:
    """source -> l1 -> l2 -> head in dni mode at window 4, every node restartable twice. Long
    enough (400 steps, a 3 ms link on every edge) to be killed after its first checkpoint, and
    set to learn steadily (128 wide, true-gradient synthesizer targets, a slow body and a quick
    head, the whole test set): seven runs of it ended within 0.34 points of each other."""
    topology = chain("dni")
    topology["data"].update(epochs=1, limit=400, eval_every=0)
    topology["checkpoint"] = {"every": 16}
    topology["links"] = {"default": {"delay_ms": 3}}
    defaults = topology["defaults"]
    defaults.update(window=4, restart={"max": 2})
    defaults["optimizer"]["lr"] = 5e-4
    defaults["synthetic_gradient"]["target"] = "backprop"
    nodes = topology["nodes"]
    nodes["l1"]["args"]["d_out"] = 128
    nodes["l2"]["args"].update(d_in=128, d_out=128)
    nodes["head"]["args"]["d_in"] = 128
    nodes["head"]["optimizer"] = {"lr": 1e-2}
    return topology


@pytest.fixture(scope="module")
def no_fault(tmp_path_factory, forkserver) -> dict:
    """The summary of the same run without a fault: one for every kill below."""
    folder = tmp_path_factory.mktemp("no_fault")
    return dni_mesh.run(write(folder, restarting_chain()), run_dir=folder / "run", quiet=True,
                        forkserver=forkserver)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("victim", ["l2", "head", "source"])
def test_a_killed_node_rejoins_and_the_run_ends_as_without_the_fault(tmp_path, no_fault, victim):
    run_dir, summary_path = tmp_path / "run", tmp_path / "summary.json"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "dni_mesh.cli", "run", str(write(tmp_path, restarting_chain())),
         "--run-dir", str(run_dir), "--no-live", "--summary", str(summary_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (run_dir / f"{victim}.ckpt").exists(), 120, f"{victim}'s first checkpoint")
        pid = json.loads((run_dir / "nodes.json").read_text())[victim]
        os.kill(pid, signal.SIGKILL)
        output, _ = launcher.communicate(timeout=180)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, output
    assert f"node {victim} (pid {pid}) exited with code -9; restarting it" in output
    assert f"node {victim} rejoined at seq" in output
    summary = json.loads(summary_path.read_text())
    nodes = summary["nodes"]
    assert {name: n["restarts"] for name, n in nodes.items()} == {
        name: int(name == victim) for name in nodes}
    assert pid != nodes[victim]["pid"] == json.loads((run_dir / "nodes.json").read_text())[victim]
    assert 0 < nodes[victim]["down_s"] < 15, output  # training resumed within 15 s of the kill
    if victim == "l2":
        assert nodes[victim]["peer_steps_while_down"] > 0, output  # its peers kept learning
    assert summary["test_accuracy"] == pytest.approx(no_fault["test_accuracy"], abs=0.005), (
        nodes[victim], output)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("most", [0, 1])
def test_a_node_that_dies_past_its_policy_fails_the_run_naming_its_restarts(tmp_path, forkserver,
                                                                              most):
    """l2 raises on its fourth training step, in every process the launcher starts for it."""
    path = misbehaving_chain(tmp_path, "raise")
    with pytest.raises(NodeFailed) as failure:
        run(path, [f"defaults.restart={{max: {most}}}"], run_dir=tmp_path / "run", quiet=True,
            forkserver=forkserver)
    plural = "" if most == 1 else "s"
    assert (f"exited with code 1 after {most} restart{plural} (restart: {{max: {most}}})"
            in str(failure.value))
    assert str(failure.value).startswith("node l2 (pid ")
    assert "boom in forward" in str(failure.value)  # the last process's output


def test_the_policy_is_a_default_a_node_may_override(tmp_path):
    topology = chain("dni")
    assert load_topology(write(tmp_path, topology)).nodes["l2"].max_restarts == 0  # never
    topology["defaults"]["restart"] = {"max": 3}
    topology["nodes"]["head"]["restart"] = {"max": 0}
    path = write(tmp_path, topology)
    assert {name: n.max_restarts for name, n in load_topology(path).nodes.items()} == {
        "source": 3, "l1": 3, "l2": 3, "head": 0}
    with pytest.raises(TopologyError, match=r"defaults\.restart\.max: input should be greater "
                                            r"than or equal to 0, got -1"):
        load_topology(path, ["defaults.restart.max=-1"])
    with pytest.raises(TopologyError, match=r"nodes\.l1\.restart\.maximum: unknown key "
                                            r"'maximum' \(did you mean 'max'\?"):
        load_topology(path, ["nodes.l1.restart.maximum=1"])


class Process(SimpleNamespace):
    """A node process that runs until told otherwise, for the launcher's bookkeeping alone."""

    def poll(self) -> int | None:
        return self.code


def step(launcher: Launcher, node: str, steps: int) -> None:
    launcher.take(node, wire.Metrics(node, steps, {"event": "step"}))


def test_an_outage_counts_from_the_death_to_the_rejoin_and_holds_off_the_stall_check(tmp_path):
    """No processes: the launcher is told of a death and of the records that follow it."""
    topology = chain("dni")
    topology["defaults"]["restart"] = {"max": 1}
    launcher = Launcher(load_topology(write(tmp_path, topology)), [], tmp_path / "run",
                        live=False, quiet=True, stall_s=5)
    pids = iter(range(100, 200))
    launcher.start_node = lambda name, **options: Process(pid=next(pids), code=None)
    try:
        launcher.nodes = {name: NodeProcess(name, launcher.start_node(name), tmp_path / name)
                          for name in topology["nodes"]}
        for name in launcher.nodes:
            launcher.take(name, wire.Ready(name))
            step(launcher, name, 30)
        l2, now = launcher.nodes["l2"], time.monotonic() - 2  # it died 2 s ago
        launcher.restart(l2, -9, now)
        assert json.loads((tmp_path / "run" / "nodes.json").read_text())["l2"] == l2.process.pid
        assert not l2.ready and l2.started == now and l2.down.steps == 30
        for name, steps in (("source", 33), ("l1", 34), ("head", 31)):
            step(launcher, name, steps)  # its peers go on as far as their windows allow
        launcher.take("l2", wire.Ready("l2"))
        launcher.check_progress(time.monotonic() + 6)  # not stuck: l2 may still rejoin
        launcher.take("l2", wire.Metrics("l2", 16, {"event": "rejoined", "seq": 34,
                                                    "checkpoint_seq": 16, "steps": 16}))
        with pytest.raises(NodeFailed, match="no node advanced for 5 s"):
            launcher.check_progress(time.monotonic() + 6)  # rejoined: the stall check is back
        summary = launcher.summary(1.0)["nodes"]
    finally:
        launcher.close()
    assert summary["l2"]["restarts"] == 1 and summary["l1"]["restarts"] == 0
    assert 2 <= summary["l2"]["down_s"] < 5
    assert summary["l2"]["steps_lost"] == 30 - 16
    assert summary["l2"]["peer_steps_while_down"] == 3 + 4 + 1
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert {"event": "restart", "node": "l2", "restarts": 1, "exit_code": -9}.items() <= next(
        r for r in records if r["event"] == "restart").items()
    rejoined = next(r for r in records if r["event"] == "rejoined")
    assert rejoined["steps_lost"] == 14 and rejoined["peer_steps_while_down"] == 8
    assert launcher.view.rows(launcher.nodes)[2][-1] == "rejoined (1 restart)"
