"""End-to-end CURVE: a mesh whose topology names a key folder (`dni-mesh keys`) runs with every
socket authenticated and encrypted, learns exactly what the same mesh learns without it, and an
outsider without the mesh's keys, who knows every port and speaks the wire protocol, cannot
deliver a single message: the run ends as if it had not been there, and the summary counts the
connections it refused. Transport-level CURVE tests are in test_security.py."""

import subprocess
import sys
import threading

import pytest
import torch
import zmq

import dni_mesh
from dni_mesh import wire
from dni_mesh.topology import load_topology
from test_mesh import DATA, chain, write

pytestmark = pytest.mark.skipif(not (DATA / "mnist").is_dir(),
                                reason=f"MNIST not found under {DATA} (set DNI_MESH_DATA)")


def forge(addresses: list[str], stop: threading.Event) -> None:
    """An outsider: dials every node's inbox and the launcher's side of it with no key, under
    a node's name, and sends forged activations, ends and stops until told to stop."""
    context = zmq.Context()
    sockets = []
    for address in addresses:
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.ROUTING_ID, b"l1")
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 10)
        socket.connect(address)
        sockets.append(socket)
    forged = [wire.Activation("l1->l2", seq, torch.ones(64, 32), torch.zeros(64, dtype=torch.long))
              for seq in range(4)] + [wire.End("l1->l2", 0), wire.Stop("launcher", "forged")]
    while not stop.is_set():
        for socket in sockets:
            for message in forged:
                try:
                    socket.send_multipart(wire.encode(message), zmq.NOBLOCK)
                except zmq.Again:
                    pass
        stop.wait(0.05)
    context.destroy(linger=0)


@pytest.mark.timeout(300)
def test_a_curve_mesh_learns_as_the_plain_one_and_an_outsider_delivers_nothing(tmp_path,
                                                                               forkserver):
    topology = chain("dni")
    plain = dni_mesh.run(write(tmp_path, topology), run_dir=tmp_path / "plain", quiet=True,
                         forkserver=forkserver)

    keys = tmp_path / "keys"
    made = subprocess.run([sys.executable, "-m", "dni_mesh.cli", "keys", str(keys), "--nodes",
                           ",".join(topology["nodes"])], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert all("SECRET" not in line.upper() or "key_secret" in line for line in made.stdout.splitlines())
    topology["security"] = {"curve": {"keys": str(keys)}}
    path = write(tmp_path, topology)
    addresses = [node.address for node in load_topology(path).nodes.values()]
    stop = threading.Event()
    outsider = threading.Thread(target=forge, args=(addresses, stop), daemon=True)
    outsider.start()
    try:
        secured = dni_mesh.run(path, run_dir=tmp_path / "curve", quiet=True, forkserver=forkserver)
    finally:
        stop.set()
        outsider.join(timeout=10)
    assert secured["test_accuracy"] == plain["test_accuracy"]
    nodes = secured["nodes"]
    assert all(n["steps"] == plain["nodes"][name]["steps"] for name, n in nodes.items())
    assert all(n["rejected"] == 0 and n["bad_messages"] == 0 for n in nodes.values())
    assert sum(n["refused_connections"] for n in nodes.values()) > 0
