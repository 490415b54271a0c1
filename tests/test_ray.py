"""The Ray launcher, for real: a Ray cluster of three Ray nodes on this machine (every one bound
to 127.0.0.1, each with a custom resource of its own), and a mesh whose topology places its
nodes on them by those resources. Each node must run on the Ray node it was placed on, learn
as under the local launcher, and leave no process behind: not the mesh's, not Ray's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dni_mesh.launch import run
from test_mesh import DATA, chain, write

ray = pytest.importorskip("ray", reason="Ray is not installed (the `ray` extra: "
                          "pip install 'dni_mesh[ray]')")
from ray.cluster_utils import Cluster  # noqa: E402  (only once Ray is known to be there)

from dni_mesh.ray_launcher import PLACEMENT_FILE, run_on_ray  # noqa: E402

pytestmark = pytest.mark.skipif(not (DATA / "mnist").is_dir(),
                                reason=f"MNIST not found under {DATA} (set DNI_MESH_DATA)")

RAY_NODES = ("ray_a", "ray_b", "ray_c")  # a custom resource per Ray node, named as the node
PLACE = {"source": "ray_a", "l1": "ray_a", "l2": "ray_b", "head": "ray_c"}


def placed_chain() -> dict:
    """The chain of test_mesh with a Ray placement: source and l1 by their host's `ray` key,
    l2 and head by their own. The local launcher ignores it."""
    topology = chain("dni")  # window 1: the run is deterministic, under any launcher
    # Addresses found at run time: each node binds where its Ray node reaches the launcher.
    topology["hosts"]["local"] = {"address": "auto"}
    topology["hosts"]["local"]["ray"] = {"num_cpus": 0.5, "resources": {"ray_a": 1}}
    for name in ("l2", "head"):
        topology["nodes"][name]["ray"] = {"num_cpus": 0.5, "resources": {PLACE[name]: 1}}
    return topology


@pytest.fixture
def cluster(monkeypatch) -> Iterator[tuple[Cluster, dict[str, str]]]:
    """Three Ray nodes on 127.0.0.1, and the Ray node id of each by its resource. Ray replaces a loopback cluster address by this machine's
    outward address unless told the cluster is local only (the constant is read at import)."""
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": "127.0.0.1", "num_cpus": 2, "resources": {RAY_NODES[0]: 2},
        "include_dashboard": False})
    try:
        node_of = {RAY_NODES[0]: cluster.head_node.node_id}
        for resource in RAY_NODES[1:]:
            node_of[resource] = cluster.add_node(node_ip_address="127.0.0.1", num_cpus=2,
                                                 resources={resource: 2}).node_id
        cluster.wait_for_nodes()
        yield cluster, node_of
    finally:
        cluster.shutdown()


def cluster_pids(cluster: Cluster) -> list[int]:
    """Every process the cluster's Ray nodes started (GCS, raylets, agents, log monitor)."""
    nodes = [cluster.head_node, *cluster.worker_nodes]
    return [info.process.pid for node in nodes for infos in node.all_processes.values()
            for info in infos]


def alive(pid: int) -> bool:
    """Whether the pid runs (a zombie has ended: it only waits for its parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.timeout(180)
def test_a_mesh_runs_on_the_ray_nodes_it_is_placed_on_and_learns_as_locally(tmp_path, cluster,
                                                                           forkserver):
    cluster, node_of = cluster
    path = write(tmp_path, placed_chain())
    local = run(path, run_dir=tmp_path / "local", quiet=True, forkserver=forkserver)

    summary = run_on_ray(path, address=cluster.address, run_dir=tmp_path / "ray", quiet=True)

    placements = json.loads((tmp_path / "ray" / PLACEMENT_FILE).read_text())
    assert {name: p["ray_node_id"] for name, p in placements.items()} == \
        {name: node_of[resource] for name, resource in PLACE.items()}
    assert {p["address"] for p in placements.values()} == {"127.0.0.1"}
    bound = sorted(n["address"] for n in summary["nodes"].values())
    assert len(set(bound)) == 4 and all(a.startswith("tcp://127.0.0.1:") for a in bound), bound
    assert abs(summary["test_accuracy"] - local["test_accuracy"]) <= 0.003
    assert all(n["steps"] == local["nodes"][name]["steps"] for name, n in summary["nodes"].items())
    assert {name: n["pid"] for name, n in summary["nodes"].items()} == \
        {name: p["pid"] for name, p in placements.items()}
    assert all((tmp_path / "ray" / f"{name}.log").exists() for name in PLACE)
    nodes = [p["pid"] for p in placements.values()]
    assert wait_gone(nodes) == [], "a mesh node outlived its run"
    actors = [p["actor_pid"] for p in placements.values()]
    assert not ray.is_initialized()  # the launcher disconnected its driver
    ray_processes = cluster_pids(cluster)
    cluster.shutdown()
    assert wait_gone(actors + ray_processes) == [], "a Ray process outlived the cluster"
