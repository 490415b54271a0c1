"""Addresses found at run time: a node with port 0 (its own, or its host's `base_port: 0`) binds
a free port, and a node whose host address is `auto` binds the address its machine reaches the
launcher from; it tells the launcher where it listens (`wire.Bound`), and dials its neighbours
only once the launcher has told it where they listen (`wire.Peers`). End to end with real processes, a
node killed and restarted (it must come back where its peers dial it), the launcher's
bookkeeping alone, and the errors of a node started by hand."""

import json
import os
import signal
import subprocess
import sys

import pytest

from dni_mesh import wire
from dni_mesh.launch import Launcher, NodeFailed, NodeProcess
from dni_mesh.topology import load_topology
from test_mesh import DATA, chain, wait_for, write
from test_restart import Process, restarting_chain

needs_mnist = pytest.mark.skipif(not (DATA / "mnist").is_dir(),
                                 reason=f"MNIST not found under {DATA} (set DNI_MESH_DATA)")


def test_port_zero_is_claimed_by_no_one(tmp_path):
    topology = chain("dni")
    topology["hosts"]["local"]["base_port"] = 0
    topology["nodes"]["head"]["port"] = 5999
    nodes = load_topology(write(tmp_path, topology)).nodes
    assert {name: n.port for name, n in nodes.items()} == {"source": 0, "l1": 0, "l2": 0, "head": 5999}
    assert nodes["l1"].address == "tcp://127.0.0.1:0"
    topology["hosts"]["local"]["base_port"] = 6000
    topology["nodes"]["l1"]["port"] = topology["nodes"]["l2"]["port"] = 0
    nodes = load_topology(write(tmp_path, topology)).nodes
    assert {name: n.port for name, n in nodes.items()} == {"source": 6000, "l1": 0, "l2": 0, "head": 5999}
    topology["hosts"]["other"] = {"address": "auto"}  # ports chosen at run time but the ones named
    topology["nodes"]["source"].update(host="other", port=5999)
    topology["nodes"]["l1"].update(host="other")
    topology["nodes"]["l1"].pop("port")
    loaded = load_topology(write(tmp_path, topology))
    assert {name: n.port for name, n in loaded.nodes.items()} == {"source": 5999, "l1": 0, "l2": 0, "head": 5999}
    assert [loaded.found_at_run_time(name) for name in loaded.nodes] == [True, True, True, False]


def test_the_launcher_tells_a_node_its_peers_once_all_of_them_listen(tmp_path):
    """No processes: Bound messages arrive one by one; each node is sent its neighbours'
    addresses once, when the last of them has bound; a second bound of one process changes
    nothing; a restart elsewhere fails the run."""
    launcher = Launcher(load_topology(write(tmp_path, chain("dni"))), [], tmp_path / "run",
                        live=False, quiet=True)
    sent: list[tuple[str, wire.Message]] = []
    launcher.inbox.send = lambda peer, message: sent.append((peer, message))
    try:
        launcher.nodes = {name: NodeProcess(name, Process(pid=1, code=None), tmp_path / name)
                          for name in ("source", "l1", "l2", "head")}
        address = {name: f"tcp://127.0.0.1:{40000 + i}" for i, name in enumerate(launcher.nodes)}
        launcher.take("l1", wire.Bound("l1", address["l1"]))
        launcher.take("source", wire.Bound("source", address["source"]))
        assert sent == [("source", wire.Peers({"l1": address["l1"]}))]
        launcher.take("l2", wire.Bound("l2", address["l2"]))
        assert sent[1:] == [("l1", wire.Peers({"source": address["source"], "l2": address["l2"]}))]
        launcher.take("head", wire.Bound("head", address["head"]))
        assert sent[2:] == [("l2", wire.Peers({"l1": address["l1"], "head": address["head"]})),
                            ("head", wire.Peers({"l2": address["l2"]}))]
        launcher.take("l1", wire.Bound("l1", "tcp://127.0.0.1:6666"))  # not the process's own
        assert launcher.nodes["l1"].address == address["l1"] and len(sent) == 4
        l2 = launcher.nodes["l2"]
        l2.restarted(Process(pid=2, code=None), 0.0)
        launcher.take("l2", wire.Bound("l2", address["l2"]))  # back where its peers dial it
        assert sent[4:] == [("l2", wire.Peers({"l1": address["l1"], "head": address["head"]}))]
        l2.restarted(Process(pid=3, code=None), 0.0)
        with pytest.raises(NodeFailed, match=r"node l2 restarted listening at tcp://127.0.0.1:40999, "
                                             r"but its peers dial it at tcp://127.0.0.1:40002"):
            launcher.take("l2", wire.Bound("l2", "tcp://127.0.0.1:40999"))
    finally:
        launcher.close()


@needs_mnist
@pytest.mark.timeout(240)
def test_a_mesh_on_ports_chosen_at_run_time_learns_and_a_killed_node_comes_back_there(tmp_path):
    run_dir, summary_path = tmp_path / "run", tmp_path / "summary.json"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "dni_mesh.cli", "run", str(write(tmp_path, restarting_chain())),
         "--set", "hosts.local.base_port=0", "--run-dir", str(run_dir), "--no-live",
         "--summary", str(summary_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (run_dir / "l2.ckpt").exists(), 120, "l2's first checkpoint")
        os.kill(json.loads((run_dir / "nodes.json").read_text())["l2"], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=180)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, output
    assert "node l2 rejoined at seq" in output
    summary = json.loads(summary_path.read_text())
    addresses = [node["address"] for node in summary["nodes"].values()]
    ports = [int(address.rsplit(":", 1)[1]) for address in addresses]
    assert all(ports) and len(set(ports)) == len(ports), addresses
    assert summary["nodes"]["l2"]["restarts"] == 1
    assert summary["test_accuracy"] > 0.8, output


@pytest.mark.timeout(60)
@pytest.mark.parametrize("port, blamed", [("nodes.l2.port=0", "its address is found at run time"),
                                           ("nodes.l1.port=0", "neighbour l1's address is found at run time"),
                                           ("hosts.local.address=auto", "its address is found at run time")])
def test_a_node_started_by_hand_needs_fixed_ports(tmp_path, port, blamed):
    path = write(tmp_path, chain("dni"))
    node = subprocess.run([sys.executable, "-m", "dni_mesh.cli", "node", str(path), "--name", "l2",
                           "--run-dir", str(tmp_path / "run"), "--set", port],
                          capture_output=True, text=True, timeout=50)
    assert node.returncode == 2, node.stdout + node.stderr
    assert f"node l2: {blamed}" in node.stderr, node.stderr
