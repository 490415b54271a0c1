"""The two-clock example: B steps once per group of 4 seqs, on A's stacked outputs, and its
gradient for every seq of the group goes back to A, in process and across real processes."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import dni_mesh
from dni_mesh import wire
from dni_mesh.build import build_core, probe
from dni_mesh.reference import Bus
from dni_mesh.topology import TopologyError, load_topology
from nodes.two_clocks import DigitStream

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "two_clocks.yaml"
TINY = ["data.epochs=1", "data.args.batches=40", "data.args.test_batches=8", "checkpoint.every=0"]


def test_labels_count_the_group_so_far() -> None:
    x, y = next(iter(DigitStream(batch_size=16, k=4, batches=8, noise=0.0)))
    assert x.shape == (16, 10) and y.shape == (16, 2)
    assert torch.equal(y[:, 0], x.argmax(1) % 2)
    assert torch.equal(y[:, 1], (x.argmax(1) < 5).long())  # the group's first seq


def test_a_group_may_not_straddle_training_and_evaluation() -> None:
    with pytest.raises(TopologyError, match=r"nodes\.b\.tick: node b ticks every 4 seqs, but the "
                                            r"training split has 38 batches, not a multiple of 4"):
        probe(load_topology(EXAMPLE, [*TINY, "data.limit=38"]))


def test_neither_a_ticking_node_nor_its_producers_may_restart() -> None:
    with pytest.raises(TopologyError, match=r"nodes\.a\.restart\.max: node a may not restart: node b "
                                            r"ticks every 4 seqs"):
        load_topology(EXAMPLE, ["nodes.a.restart.max=1"])
    assert load_topology(EXAMPLE, ["nodes.parity.restart.max=1"]).nodes["parity"].max_restarts == 1


def test_in_process_b_steps_once_per_group_and_its_gradient_reaches_a() -> None:
    topology = load_topology(EXAMPLE, TINY)
    found = probe(topology)
    bus = Bus({name: build_core(topology, name, time.monotonic, found) for name in topology.nodes})
    to_a: list[wire.Gradient] = []
    post = bus.post

    def spy(node: str, peer: str, message: wire.Message) -> None:
        if node == "a" and peer == "b" and isinstance(message, wire.Gradient):
            to_a.append(message)
        post(node, peer, message)

    bus.post = spy
    bus.start()
    bus.run()
    assert all(core.finished for core in bus.cores.values()), bus.stuck()
    steps = {n: sum(1 for node, r in bus.records if node == n and r.values["event"] == "step")
             for n in ("a", "b")}
    assert steps == {"a": 40, "b": 10}
    trained = [m for m in to_a if m.dh is not None]
    assert sorted(m.seq for m in trained) == list(range(40))  # every seq of every group
    assert all(m.dh.shape == (64, 4) for m in trained) and any(m.dh.abs().sum() > 0 for m in trained)
    assert bus.cores["a"].stage.stats.sg_fits == 40


def test_real_processes_b_steps_a_quarter_of_a(tmp_path: Path, forkserver) -> None:
    summary = dni_mesh.run(EXAMPLE, TINY, quiet=True, run_dir=tmp_path, forkserver=forkserver)
    nodes = summary["nodes"]
    assert nodes["a"]["steps"] == 40 and nodes["b"]["steps"] == nodes["a"]["steps"] // 4
