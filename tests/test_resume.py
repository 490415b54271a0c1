"""Checkpoints as the node cores make them, resumed in one process (`train_in_process`): every
node saves before the same seqs, so a mesh restarted from one cut continues as if never stopped.
The mesh and `dni-mesh run --resume` are tested end to end in test_mesh.py."""

import os
from pathlib import Path

import pytest
import yaml

from dni_mesh.reference import train_in_process
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
