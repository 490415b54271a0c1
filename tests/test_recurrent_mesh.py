"""End-to-end: a stacked LSTM language model on Penn Treebank characters, split over real node
processes (source -> LSTM layer -> LSTM layer + softmax head), each recurrent node carrying its
state across chunks. At window 1 the mesh must compute what the in-process run of the same
topology computes (`dni_mesh.reference.train_in_process`), for truncated BPTT with locked edges
and for DNI in time and between the nodes."""

import json
import os
from pathlib import Path

import pytest
import yaml

import dni_mesh
from dni_mesh.reference import train_in_process
from dni_mesh.topology import load_topology
from dni_mesh.transport import free_port_range
from nodes.ptb import PennTreebank

DATA = Path(os.environ.get("DNI_MESH_DATA", Path(__file__).parents[2] / "shared" / "data")).resolve()
pytestmark = pytest.mark.skipif(not (DATA / "ptb").is_dir(),
                                reason=f"Penn Treebank not found under {DATA} (set DNI_MESH_DATA)")
STEPS, CHUNK, TOKENS = 12, 5, 2000


def stacked(mode: str, time: str) -> dict:
    vocab = PennTreebank("test", "char", batch_size=4, chunk=CHUNK, data_dir=DATA,
                         limit=TOKENS).num_classes
    return {
        "name": f"ptb-{mode}-{time}", "mode": mode, "seed": 5,
        "data": {"source": "ptb", "args": {"level": "char", "chunk": CHUNK, "limit": TOKENS},
                 "batch_size": 4, "epochs": 1, "limit": STEPS, "data_dir": str(DATA)},
        "defaults": {"optimizer": {"name": "adam", "lr": 3e-3}, "window": 1, "time": time,
                     "synthetic_gradient": {"optimizer": {"name": "adam", "lr": 1e-3}}},
        "nodes": {"source": {"role": "source"},
                  "l1": {"module": "nodes.lstm:LSTM",
                         "args": {"d_in": vocab, "d_hidden": 24, "tokens": True}},
                  "head": {"role": "head", "module": "nodes.lstm:LSTMHead",
                           "args": {"d_in": 24, "d_hidden": 24, "vocab": vocab}}},
        "edges": ["source -> l1", "l1 -> head"],
        "hosts": {"local": {"address": "127.0.0.1", "base_port": free_port_range(8)}},
    }


def records(lines: list[dict], event: str) -> list[dict]:
    return [r for r in lines if r.get("event") == event]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode, time", [("backprop", "bptt"), ("dni", "dni")])
def test_stacked_lstm_mesh_equals_the_in_process_run(tmp_path, forkserver, mode, time):
    path = tmp_path / "ptb.yaml"
    path.write_text(yaml.safe_dump(stacked(mode, time), sort_keys=False))
    summary = dni_mesh.run(path, run_dir=tmp_path / "run", quiet=True, forkserver=forkserver)
    head = [json.loads(line) for line in (tmp_path / "run" / "head.jsonl").read_text().splitlines()]

    bus = train_in_process(load_topology(path))
    reference = [r.values for node, r in bus.records if node == "head"]

    losses = [r["loss"] for r in records(head, "step")]
    assert len(losses) == STEPS
    assert losses == pytest.approx([r["loss"] for r in records(reference, "step")], abs=1e-5)
    [mesh_eval], [reference_eval] = records(head, "eval"), records(reference, "eval")
    assert mesh_eval["test_bits_per_token"] == pytest.approx(reference_eval["test_bits_per_token"], abs=1e-5)
    assert mesh_eval["test_labelled"] == reference_eval["test_labelled"] > 0
    assert 0 < summary["nodes"]["l1"]["steps"] == STEPS

