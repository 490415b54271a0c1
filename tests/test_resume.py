"""Checkpoints as the node cores make them, resumed in one process (`train_in_process`): every
node saves before the same seqs, so a mesh restarted from one cut continues as if never stopped.
The mesh and `dni-mesh run --resume` are tested end to end in test_mesh.py."""

import os
import time
from pathlib import Path

import pytest
import yaml

from dni_mesh.build import build_core, probe
from dni_mesh.reference import Bus, train_in_process
from dni_mesh.topology import load_topology
from dni_mesh.transport import free_port_range

DATA = Path(os.environ.get("DNI_MESH_DATA", Path(__file__).parents[2] / "shared" / "data")).resolve()
pytestmark = pytest.mark.skipif(not (DATA / "mnist").is_dir(),
                                reason=f"MNIST not found under {DATA} (set DNI_MESH_DATA)")


def topology(tmp_path: Path, mode: str, window: int):
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump({
        "name": "resume", "mode": mode, "seed": 2,
        "data": {"source": "mnist", "batch_size": 32, "epochs": 2, "eval_every": 1, "limit": 12,
                 "data_dir": str(DATA), "args": {"limit": 1024}},
        "checkpoint": {"every": 5},
        "defaults": {"optimizer": {"name": "adam", "lr": 1e-3}, "window": window},
        "nodes": {"source": {"role": "source"},
                  "l1": {"module": "nodes.mlp:Block", "args": {"d_in": 784, "d_out": 16}},
                  "head": {"role": "head", "module": "nodes.mlp:Classifier",
                           "args": {"d_in": 16, "classes": 10}}},
        "edges": ["source -> l1", "l1 -> head"],
        "hosts": {"local": {"address": "127.0.0.1", "base_port": free_port_range(4)}},
    }))
    return load_topology(path)


def head_records(bus, event: str) -> list[dict]:
    return [r.values for node, r in bus.records if node == "head" and r.values["event"] == event]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["backprop", "dni"])
def test_a_run_resumed_from_any_cut_continues_bit_identically_at_window_1(tmp_path, mode):
    mesh = topology(tmp_path, mode, window=1)
    whole = train_in_process(mesh)
    cuts: dict[int, dict[str, dict]] = {}
    for node, save in whole.saves:
        cuts.setdefault(save.seq, {})[node] = save.state
    # Every 5 seqs (train batches only: 12 per epoch, then the test set) and after each
    # evaluation pass; every node at every cut.
    assert all(set(states) == {"source", "l1", "head"} for states in cuts.values())
    test_batches = head_records(whole, "eval")[0]["test_samples"] // 32
    assert {5, 10, 12 + test_batches} <= set(cuts)
    assert all(seq % 5 == 0 or seq == 12 + test_batches for seq in cuts)
    losses = [r["loss"] for r in head_records(whole, "step")]
    for seq in (5, 12 + test_batches, max(cuts)):  # mid-epoch, after an evaluation, last
        states = cuts[seq]
        resumed = train_in_process(mesh, resume=states)
        steps_before = states["head"]["core"]["counters"]["steps"]
        assert [r["loss"] for r in head_records(resumed, "step")] == losses[steps_before:]
        assert head_records(resumed, "eval")[-1] == head_records(whole, "eval")[-1]


@pytest.mark.timeout(120)
def test_a_deep_window_resumes_and_finishes_every_step(tmp_path):
    """At window 3 the gradients in flight at the cut are lost (they are not state); the run
    still resumes at the cut and takes every remaining step."""
    mesh = topology(tmp_path, "dni", window=3)
    whole = train_in_process(mesh)
    seq, states = next((s.seq, {}) for _, s in whole.saves if s.seq == 10)
    states.update({node: s.state for node, s in whole.saves if s.seq == seq})
    resumed = train_in_process(mesh, resume=states)
    assert states["head"]["core"]["counters"]["steps"] + len(head_records(resumed, "step")) == 24


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim, order", [("l1", 1), ("l1", -1), ("head", 1), ("source", 1)])
def test_a_node_restarted_from_its_checkpoint_rejoins_and_the_run_finishes(tmp_path, victim, order):
    """Mid-run the victim's core is replaced by one restored from its newest checkpoint, as
    `dni-mesh node --rejoin` does after a crash (what was in its inbox is lost; what its peers
    had queued for it arrives); after the rejoin handshake every node finishes. order -1: its
    upstream answers first, and sends on before the downstream answers."""
    mesh = topology(tmp_path, "dni", window=3)
    found = probe(mesh)
    bus = Bus({name: build_core(mesh, name, time.monotonic, found) for name in mesh.nodes})
    bus.start()
    while not any(node == victim and save.seq >= 10 for node, save in bus.saves):
        bus.deliver()
    for _ in range(7):  # the victim goes on a little past its checkpoint, then dies
        bus.deliver()
    save = [s for node, s in bus.saves if node == victim][-1]
    lost = bus.cores[victim].counters.steps - save.state["core"]["counters"]["steps"]
    bus.cores[victim] = build_core(mesh, victim, time.monotonic, found, save.state)
    bus.carry_out(victim, bus.cores[victim].rejoin(save.seq)[::order])
    bus.run()
    assert all(core.finished for core in bus.cores.values()), bus.stuck()
    [rejoined] = [r.values for node, r in bus.records if r.values["event"] == "rejoined"]
    assert rejoined["seq"] >= save.seq and rejoined["checkpoint_seq"] == save.seq
    peers = [r.values for node, r in bus.records if r.values["event"] == "peer_rejoined"]
    assert {p["peer"] for p in peers} == {victim}
    assert len(peers) == len([e for e in mesh.edges if victim in (e.src, e.dst)])
    head_steps = bus.cores["head"].counters.steps
    assert lost >= 0 and head_steps <= 24 and head_steps >= 24 - 3 * 3  # at most a few windows lost
    assert sum(core.counters.expired for core in bus.cores.values()) > 0
