"""Complete unlock (paper section 3.4): a stage that steps on its synthetic input I(x) as soon
as the source's batch is there, in its core, in topology files, and as a mesh of processes equal
to the in-process run at window 1."""
import json
import re
from functools import partial

import pytest
import torch
import yaml

import dni_mesh
from dni_mesh import wire
from dni_mesh.build import make_stage, probe
from dni_mesh.core import EdgeKind, InEdge, OutEdge, Send, StageCore, Wiring
from dni_mesh.reference import train_in_process
from dni_mesh.synthetic import SyntheticGradientConfig
from dni_mesh.topology import TopologyError, load_topology
from dni_mesh.update import update_rule
from nodes.mlp import Block
from dni_mesh.transport import free_port_range
from tests.test_mesh import DATA

torch.set_num_threads(1)
INPUT = {"hidden": 1, "width": 16, "optimizer": {"name": "adam", "lr": 1e-3}}


def unlocked(window: int = 1, target: str = "bootstrap") -> StageCore:
    """l2 (6 -> 5 features) fed by l1, with a trigger edge from the source (4 features)."""
    inputs = (InEdge("l1->l2", "l1", window, True, (6,), torch.float32),
              InEdge("source->l2", "source", window, False, (4,), torch.float32,
                     kind=EdgeKind.TRIGGER))
    stage = make_stage("l2", partial(Block, 6, 5), input_shapes=[(6,)],
                       optimizer={"name": "adam", "lr": 0.01}, rule=update_rule("cdni", target=target),
                       synthetic_gradient=SyntheticGradientConfig(optimizer={"name": "adam", "lr": 1e-3}),
                       num_classes=3, window=window, synthetic_input=INPUT, source_shape=(4,))
    wiring = Wiring("l2", inputs, (OutEdge("l2->head", "head"),), window, True, 8, 3)
    return StageCore(wiring, stage, lambda: 0.0)


def batch(seq: int, edge: str, d: int, phase: str = "train") -> wire.Activation:
    g = torch.Generator().manual_seed(seq)
    labels = torch.randint(0, 3, (8,), generator=g)
    return wire.Activation(edge, seq, torch.randn(8, d, generator=g), labels, phase)


def weights(core: StageCore) -> list[torch.Tensor]:
    return [p.detach().clone() for p in core.stage.module.parameters()]


def changed(before: list[torch.Tensor], core: StageCore) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, weights(core)))


def test_the_source_batch_alone_steps_the_node_and_the_real_input_does_not():
    core = unlocked()
    core.receive("source", batch(0, "source->l2", 4))
    assert core.stage.stats.steps == 1  # no real input yet (M starts silent: no change yet)
    assert core.waiting_for() == "activation seq 0 on l1->l2 from l1"
    before = weights(core)
    actions = core.receive("l1", batch(0, "l1->l2", 6))
    assert not changed(before, core) and core.stage.stats.input_fits == 1
    answers = {a.node: a.message for a in actions if isinstance(a, Send)}
    assert answers["source"].dh is None  # the trigger edge takes a bare credit
    assert tuple(answers["l1"].dh.shape) == (8, 6)  # the bootstrapped gradient for l1's output
    assert answers["head"].seq == 0 and tuple(answers["head"].h.shape) == (8, 5)
    core.receive("head", wire.Gradient("l2->head", 0, torch.ones(8, 5)))  # M learns
    core.receive("source", batch(1, "source->l2", 4))
    assert changed(before, core) and core.stage.stats.steps == 2


def test_with_backprop_targets_the_answer_upstream_waits_for_the_true_gradient():
    core = unlocked(target="backprop")
    core.receive("source", batch(0, "source->l2", 4))
    before = weights(core)
    actions = core.receive("l1", batch(0, "l1->l2", 6))
    assert [a.node for a in actions if isinstance(a, Send)] == ["head"]  # its producers wait
    answer = core.receive("head", wire.Gradient("l2->head", 0, torch.ones(8, 5)))
    upstream = {a.node: a.message for a in answer if isinstance(a, Send)}["l1"]
    assert tuple(upstream.dh.shape) == (8, 6) and upstream.dh.abs().sum() > 0
    assert not changed(before, core)  # only synthetic steps update the module


def test_the_window_bounds_how_far_synthetic_steps_run_ahead():
    core = unlocked(window=2)
    for seq in range(2):
        core.receive("source", batch(seq, "source->l2", 4))
    assert core.stage.stats.steps == 2 and core.synthetic_seq == 2
    core.receive("l1", batch(0, "l1->l2", 6))  # output 0 in flight, step 1 ahead: the window is full
    core.receive("source", batch(2, "source->l2", 4))
    assert core.stage.stats.steps == 2
    core.receive("head", wire.Gradient("l2->head", 0, torch.ones(8, 5)))
    assert core.stage.stats.steps == 3 and core.stage.stats.sg_fits == 1


def test_evaluation_batches_take_no_synthetic_step_and_none_runs_ahead_of_a_pass():
    core = unlocked(window=3)
    core.receive("source", batch(0, "source->l2", 4, phase="eval"))
    assert core.stage.stats.steps == 0 and core.synthetic_seq == 1
    core.receive("source", batch(1, "source->l2", 4))  # training resumes after the pass...
    assert core.stage.stats.steps == 0  # ...but not before the pass was evaluated
    core.receive("l1", batch(0, "l1->l2", 6, phase="eval"))
    assert core.eval.batches == 1 and core.stage.stats.steps == 1


def test_synthetic_steps_leave_batch_norm_statistics_to_the_real_inputs():
    core = unlocked()
    buffers = {name: b.clone() for name, b in core.stage.module.named_buffers()}
    core.receive("source", batch(0, "source->l2", 4))
    for name, b in core.stage.module.named_buffers():
        assert torch.equal(b, buffers[name]), name
    core.receive("l1", batch(0, "l1->l2", 6))
    assert int(core.stage.module.state_dict()["net.2.num_batches_tracked"]) == 1


def test_a_seq_a_producer_skipped_is_stepped_over():
    core = unlocked(window=3)
    core.skip(range(0, 1))
    core.receive("source", batch(1, "source->l2", 4))
    assert core.synthetic_seq == 2 and core.stage.stats.steps == 1


def test_the_synthetic_input_is_saved_and_restored():
    core, other = unlocked(), unlocked()
    core.receive("source", batch(0, "source->l2", 4))
    core.receive("l1", batch(0, "l1->l2", 6))
    other.restore(json.loads(json.dumps({"core": core.state_dict()})) | {"stage": core.stage.state_dict()})
    for a, b in zip(core.stage.synthetic_input.parameters(), other.stage.synthetic_input.parameters()):
        assert torch.equal(a, b)
    assert other.synthetic_seq == 1


def chain(**l2: object) -> dict:
    """source -> l1 -> l2 -> head on MNIST, l2 completely unlocked."""
    return {
        "name": "unlock", "mode": "cdni", "seed": 2,
        "data": {"source": "mnist", "batch_size": 32, "epochs": 1, "eval_every": 0, "limit": 12,
                 "args": {"limit": 512}, "data_dir": str(DATA)},  # 16 test batches
        "defaults": {"optimizer": {"name": "adam", "lr": 1e-3}, "window": 1,
                     "synthetic_gradient": {"optimizer": {"name": "adam", "lr": 1e-4}}},
        "nodes": {"source": {"role": "source"},
                  "l1": {"module": "nodes.mlp:Block", "args": {"d_in": 784, "d_out": 32}},
                  "l2": {"module": "nodes.mlp:Block", "args": {"d_in": 32, "d_out": 32},
                         "synthetic_input": INPUT, **l2},
                  "head": {"role": "head", "module": "nodes.mlp:Classifier",
                           "args": {"d_in": 32, "classes": 10}}},
        "edges": ["source -> l1", "l1 -> l2", "l2 -> head"],
        "hosts": {"local": {"address": "127.0.0.1", "base_port": free_port_range(8)}},
    }


def write(tmp_path, topology: dict):
    path = tmp_path / "unlock.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    return path


def test_the_topology_adds_a_trigger_edge_from_the_source(tmp_path):
    top = load_topology(write(tmp_path, chain()))
    assert [(e.name, e.kind) for e in top.in_edges("l2")] == [("l1->l2", "data"), ("source->l2", "trigger")]
    assert [e.name for e in top.inputs("l2")] == ["l1->l2"] and "source" in top.neighbours("l2")


def test_a_deeper_node_unlocked_alone_and_listed_first_comes_after_its_producer(tmp_path):
    topology = chain()
    topology["nodes"]["l3"] = {"module": "nodes.mlp:Block", "args": {"d_in": 32, "d_out": 32},
                               "synthetic_input": INPUT}
    del topology["nodes"]["l2"]["synthetic_input"]
    topology["nodes"] = {name: topology["nodes"][name] for name in ("l3", "source", "l1", "l2", "head")}
    topology["edges"] = ["source -> l1", "l1 -> l2", "l2 -> l3", "l3 -> head"]
    top = load_topology(write(tmp_path, topology))
    assert top.topological_order() == ["source", "l1", "l2", "l3", "head"]
    assert probe(top).shapes["l3"] == (32,)


@pytest.mark.parametrize("change, key, problem", [
    (lambda t: t["nodes"]["head"].update(synthetic_input={}), "nodes.head.synthetic_input",
     "only a stage takes a synthetic input, not a head"),
    (lambda t: t["nodes"]["l1"].update(synthetic_input={}), "nodes.l1.synthetic_input",
     "comes from the source 'source' already"),
    (lambda t: t.update(mode="backprop"), "nodes.l2.synthetic_input", "needs mode dni or cdni"),
    (lambda t: t["edges"].append("source -> l2"), "nodes.l2.synthetic_input", "it has 2 in-edges"),
    (lambda t: t["nodes"]["l1"].update(restart={"max": 1}), "nodes.l1.restart.max",
     "its consumer l2 has a synthetic input"),
    (lambda t: t["nodes"]["l2"].update(synthetic_input={"width": 0}), "nodes.l2.synthetic_input.width",
     "greater than or equal to 1"),
])
def test_a_synthetic_input_where_it_cannot_work_is_refused_by_key(tmp_path, change, key, problem):
    topology = chain()
    change(topology)
    with pytest.raises(TopologyError) as error:
        load_topology(write(tmp_path, topology))
    assert error.value.key == key and re.search(problem, error.value.message), str(error.value)


@pytest.mark.timeout(300)
def test_the_unlocked_mesh_equals_the_in_process_run(tmp_path, forkserver):
    path = write(tmp_path, chain())
    summary = dni_mesh.run(path, run_dir=tmp_path / "run", quiet=True, forkserver=forkserver)
    lines = [json.loads(line) for line in (tmp_path / "run" / "head.jsonl").read_text().splitlines()]
    bus = train_in_process(load_topology(path))
    reference = [r.values for node, r in bus.records if node == "head"]

    def of(records, event, key):
        return [r[key] for r in records if r.get("event") == event]

    assert len(of(lines, "step", "loss")) == 12
    assert of(lines, "step", "loss") == pytest.approx(of(reference, "step", "loss"), abs=1e-5)
    assert of(lines, "eval", "test_accuracy") == of(reference, "eval", "test_accuracy")
    l2 = [json.loads(line) for line in (tmp_path / "run" / "l2.jsonl").read_text().splitlines()]
    fits = of(l2, "step", "input_loss")
    assert len(fits) == 12 and fits[-1] < fits[0]  # I learns its input
    assert set(of(l2, "step", "synthetic_ahead")) == {0}  # window 1: never ahead of the real step
    assert summary["nodes"]["l2"]["steps"] == 12


@pytest.mark.parametrize("peer, message, reason", [
    ("l1", batch(0, "source->l2", 4), "fed by 'source', not by this peer"),
    ("source", batch(0, "source->l2", 5), r"expected torch.float32 \[batch, 4\]"),
    ("source", batch(5, "source->l2", 4), "outside the window"),
    ("source", wire.Gradient("source->l2", 0, torch.ones(8, 4)), "no out-edge"),
])
def test_a_bad_message_on_the_trigger_edge_is_rejected_and_steps_nothing(peer, message, reason):
    core = unlocked()
    [reject] = core.receive(peer, message)
    assert re.search(reason, reject.reason), reject.reason
    assert core.stage.stats.steps == 0 and core.synthetic_seq == 0 and core.counters.rejected == 1
