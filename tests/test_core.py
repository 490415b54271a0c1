"""The node core without processes or sockets: every event path, every check of a message
against the node's wiring, and the in-process bus running whole meshes of cores."""
import re
from functools import partial

import pytest
import torch
import yaml

from dni_mesh import wire
from dni_mesh.build import build_core, make_stage
from dni_mesh.core import (Acknowledge, Batch, EndEdge, EpochEnd, Gather, InEdge, OutEdge, Record,
                           Reject, Send, SourceCore, StageCore, Wiring)
from dni_mesh.reference import Bus
from dni_mesh.synthetic import SyntheticGradientConfig
from dni_mesh.topology import load_topology
from dni_mesh.update import update_rule
from nodes.mlp import Block, Classifier

torch.set_num_threads(1)
SG = SyntheticGradientConfig(optimizer={"name": "adam", "lr": 1e-3})


class Clock:
    """A clock the test moves by hand."""
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def core(mode="dni", window=1, head=False, fan_in=False, src_window=1, target="bootstrap"):
    """l1 (or a head) fed by the source (and, with fan_in, by node `b` too), 4 -> 6 features."""
    inputs = [InEdge("source->l1", "source", src_window, False, (4,), torch.float32)]
    if fan_in:
        inputs.append(InEdge("b->l1", "b", src_window, True, (2,), torch.float32))
    module = partial(Classifier, 4 + 2 * fan_in, 3) if head else partial(Block, 4 + 2 * fan_in, 6)
    stage = make_stage("l1", (lambda: _Cat(module())) if fan_in else module,
                       input_shapes=[e.shape for e in inputs], optimizer={"name": "adam", "lr": 0.01},
                       rule=None if head else update_rule(mode, target=target),
                       synthetic_gradient=SG, num_classes=3, window=window)
    outputs = () if head else (OutEdge("l1->head", "head"),)
    return StageCore(Wiring("l1", tuple(inputs), outputs, window, True, 8, 3), stage, Clock())


class _Cat(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *xs):
        return self.inner(torch.cat(xs, dim=1))


def act(seq, edge="source->l1", n=8, d=4, labels=True, phase="train", dtype=torch.float32):
    g = torch.Generator().manual_seed(seq)
    y = torch.randint(0, 3, (n,), generator=g) if labels else None
    return wire.Activation(edge, seq, torch.randn(n, d, generator=g).to(dtype), y, phase)


def sends(actions, kind=None):
    return [a for a in actions if isinstance(a, Send) and (kind is None or isinstance(a.message, kind))]


def rejects(actions):
    return [a for a in actions if isinstance(a, Reject)]


def test_a_dni_stage_steps_answers_and_ends():
    c = core()
    actions = c.receive("source", act(0))
    out, = sends(actions, wire.Activation)
    credit, = sends(actions, wire.Gradient)
    assert (out.node, out.message.edge, out.message.seq, tuple(out.message.h.shape)) == ("head", "l1->head", 0, (8, 6))
    assert (credit.node, credit.message.dh) == ("source", None)  # the source takes a bare credit
    assert c.outputs.full() and c.waiting_for() == "the answer to seq 0 on l1->head from head"
    # the next batch waits in the join until the head answers
    assert sends(c.receive("source", act(1)), wire.Activation) == []
    fitted = c.receive("head", wire.Gradient("l1->head", 0, torch.ones(8, 6)))
    assert c.stage.stats.sg_fits == 1 and [a.message.seq for a in sends(fitted, wire.Activation)] == [1]
    assert any(isinstance(a, Record) and a.values["event"] == "fit" for a in fitted)
    c.receive("head", wire.Gradient("l1->head", 1, torch.ones(8, 6)))
    ended = c.receive("source", wire.End("source->l1", 2))
    assert ended[0] == Acknowledge("source", wire.End("source->l1", 2))
    assert EndEdge("head", "l1->head", 2) in ended and c.finished
    assert (c.counters.steps, c.counters.samples, c.counters.rejected) == (2, 16, 0)


def test_a_locked_stage_answers_upstream_only_when_its_gradient_comes_back():
    c = core("backprop")
    actions = c.receive("source", act(0))
    assert sends(actions, wire.Gradient) == []
    answered = c.receive("head", wire.Gradient("l1->head", 0, torch.ones(8, 6)))
    credit, = sends(answered, wire.Gradient)
    assert credit.node == "source" and c.stage.stats.steps == 1


@pytest.mark.parametrize("peer, message, reason", [
    ("source", act(0, edge="x->l1"), "no in-edge 'x->l1'"),
    ("intruder", act(0), "fed by 'source', not by this peer"),
    ("source", act(1), r"outside the window \[0, 1\)"),
    ("source", act(0, d=5), "expected torch.float32 \\[batch, 4\\]"),
    ("source", act(0, dtype=torch.float64), "is torch.float64"),
    ("source", act(0, n=9), "batch of 9"),
    ("source", act(0, labels=False), "without labels"),
    ("source", wire.Activation("source->l1", 0, torch.zeros(8, 4), torch.full((8,), 3)), r"outside \[0, 3\)"),
    ("source", wire.Activation("source->l1", 0, torch.zeros(8, 4), torch.zeros(7, dtype=torch.long)), "labels"),
    ("source", wire.End("source->l1", 5), "counts 5 activations, 0 arrived"),
    ("intruder", wire.End("source->l1", 0), "fed by 'source', not by this peer"),
    ("head", wire.Gradient("l1->head", 0, torch.ones(8, 6)), "no output seq 0"),
    ("intruder", wire.Gradient("l1->head", 0, None), "answered by 'head'"),
    ("head", wire.Gradient("l2->head", 0, None), "no out-edge"),
])
def test_a_message_that_does_not_fit_is_rejected_and_nothing_is_kept(peer, message, reason):
    c = core()
    actions = c.receive(peer, message)
    assert len(actions) == 1 and re.search(reason, rejects(actions)[0].reason)
    assert (c.counters.rejected, c.counters.progress, c.arrived, c.ended) == (1, 0, {}, set())
    assert not c.finished


def test_kinds_a_node_does_not_take_are_unexpected():
    c = core()
    for message in (wire.Stop("l1", "forged"), wire.Hello("l1", 1, "h", "tcp://x:1"),
                    wire.EndAck("source->l1", 0), wire.Metrics("l1", 0, {})):
        assert rejects(c.receive("launcher", message))
    assert (c.counters.unexpected, c.counters.rejected) == (4, 0)


def test_answers_that_do_not_fit_the_output_are_rejected():
    c = core()
    c.receive("source", act(0))
    for message, reason in [
        (wire.Gradient("l1->head", 0, None), "needs its gradient"),
        (wire.Gradient("l1->head", 0, torch.ones(8, 5)), "the output was [8, 6]"),
        (wire.Gradient("l1->head", 0, torch.ones(8, 6, dtype=torch.long)), "torch.int64"),
    ]:
        assert reason in rejects(c.receive("head", message))[0].reason
    assert c.outputs.pending and c.receive("head", wire.Gradient("l1->head", 0, torch.ones(8, 6)))
    assert "no output seq 0" in rejects(c.receive("head", wire.Gradient("l1->head", 0, torch.ones(8, 6))))[0].reason
    c.receive("source", act(1, phase="eval"))
    assert "bare credit" in rejects(c.receive("head", wire.Gradient("l1->head", 1, torch.ones(8, 6))))[0].reason


def test_duplicates_late_activations_and_a_second_end_are_rejected():
    c = core(src_window=4)
    c.receive("source", act(2))
    assert "arrived twice" in rejects(c.receive("source", act(2)))[0].reason
    assert "outside the window [0, 4)" in rejects(c.receive("source", act(4)))[0].reason
    for seq in (0, 1):
        c.receive("source", act(seq))
        c.receive("head", wire.Gradient("l1->head", seq, torch.ones(8, 6)))
    c.receive("head", wire.Gradient("l1->head", 2, torch.ones(8, 6)))
    assert isinstance(c.receive("source", wire.End("source->l1", 3))[0], Acknowledge)
    assert "has ended" in rejects(c.receive("source", wire.End("source->l1", 3)))[0].reason
    assert "has ended" in rejects(c.receive("source", act(3)))[0].reason


def test_fan_in_joins_every_edge_of_a_seq_and_refuses_a_mixed_join():
    c = core(fan_in=True)
    assert c.receive("source", act(0)) == [] and c.waiting_for() == "activation seq 0 on b->l1 from b"
    mixed = c.receive("b", act(0, edge="b->l1", d=2, phase="eval"))
    assert "is a eval batch of 8" in rejects(mixed)[0].reason
    stepped = c.receive("b", act(0, edge="b->l1", d=2))
    answers = {a.node: a.message for a in sends(stepped, wire.Gradient)}
    assert answers["source"].dh is None and answers["b"].dh.shape == (8, 2)


def test_ends_that_disagree_across_in_edges_are_rejected():
    c = core(fan_in=True, src_window=4)
    c.receive("source", act(0))
    assert "seq 0 arrived on another edge" in rejects(c.receive("b", wire.End("b->l1", 0)))[0].reason
    c.receive("b", act(0, edge="b->l1", d=2))
    c.receive("head", wire.Gradient("l1->head", 0, torch.ones(8, 6)))
    assert isinstance(c.receive("b", wire.End("b->l1", 1))[0], Acknowledge)
    assert "can never be joined: b->l1 ended after 1" in rejects(c.receive("source", act(1)))[0].reason


class Ignores(torch.nn.Module):
    """A fan-in module that does not use its second input."""
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 6)

    def forward(self, x, unused):
        return self.linear(x)


@pytest.mark.parametrize("mode, target", [("dni", "bootstrap"), ("dni", "backprop"), ("backprop", "bootstrap")])
def test_an_input_the_module_ignores_is_answered_with_a_zero_gradient(mode, target):
    inputs = (InEdge("source->l1", "source", 1, False, (4,), torch.float32),
              InEdge("b->l1", "b", 1, True, (2,), torch.float32))
    stage = make_stage("l1", Ignores, input_shapes=[(4,), (2,)], optimizer={"name": "adam", "lr": 0.01},
                       rule=update_rule(mode, target=target), synthetic_gradient=SG, num_classes=3)
    c = StageCore(Wiring("l1", inputs, (OutEdge("l1->head", "head"),), 1, True, 8, 3), stage, Clock())
    c.receive("source", act(0))
    actions = c.receive("b", act(0, edge="b->l1", d=2))
    actions += c.receive("head", wire.Gradient("l1->head", 0, torch.ones(8, 6)))
    answer, = [a.message for a in sends(actions, wire.Gradient) if a.node == "b"]
    assert torch.equal(answer.dh, torch.zeros(8, 2))


def test_the_eval_pass_reports_labelled_accuracy_and_every_sample():
    c = core(head=True)
    c.receive("source", act(0, phase="eval"))
    c.receive("source", act(1, phase="eval", labels=False))
    actions = c.receive("source", wire.End("source->l1", 2))
    record, = [a for a in actions if isinstance(a, Record)]
    assert record.values["event"] == "eval" and record.values["test_samples"] == 16
    assert record.values["test_labelled"] == 8 and 0 <= record.values["test_accuracy"] <= 1
    unlabelled = core(head=True)
    unlabelled.receive("source", act(0, phase="eval", labels=False))
    record, = [a for a in unlabelled.receive("source", wire.End("source->l1", 1)) if isinstance(a, Record)]
    assert "test_accuracy" not in record.values and record.values["test_samples"] == 8


def test_a_source_keeps_its_window_and_ends_when_all_is_answered():
    wiring = Wiring("source", (), (OutEdge("source->l1", "l1"),), 2, False, 8, 3)
    data = [Batch(torch.zeros(8, 4), torch.zeros(8, dtype=torch.long), "train") for _ in range(3)]
    c = SourceCore(wiring, iter([*data, EpochEnd(1)]), Clock())
    first = c.advance()
    assert [a.message.seq for a in sends(first)] == [0, 1] and c.waiting_for() == "the answer to seq 0 on source->l1 from l1"
    assert "takes a bare credit" in rejects(c.receive("l1", wire.Gradient("source->l1", 0, torch.ones(8, 4))))[0].reason
    assert [a.message.seq for a in sends(c.receive("l1", wire.Gradient("source->l1", 0)))] == [2]
    epoch = c.receive("l1", wire.Gradient("source->l1", 1))  # the data ran out after seq 2
    assert Record({"event": "epoch", "epoch": 1, "sent": 3}, True) in epoch and not c.finished
    last = c.receive("l1", wire.Gradient("source->l1", 2))
    assert last == [EndEdge("l1", "source->l1", 3)] and c.finished
    assert rejects(c.receive("l1", act(0)))


def test_core_state_round_trips():
    c = core(src_window=4)
    for seq in range(3):
        c.receive("source", act(seq))
        c.receive("head", wire.Gradient("l1->head", seq, torch.ones(8, 6)))
    fresh = core(src_window=4)
    fresh.load_state_dict(c.state_dict())
    assert (fresh.next_seq, fresh.accepted, fresh.outputs.sent, fresh.counters) == \
        (3, {"source->l1": 3}, 3, c.counters)
    assert isinstance(fresh.receive("source", act(3))[0], Send)


TOPOLOGY = {
    "name": "bus", "mode": "dni", "seed": 1,
    "data": {"source": "nodes.data:Blobs", "batch_size": 32, "epochs": 2, "eval_every": 1,
             "args": {"num_samples": 256, "dim": 16}},
    "defaults": {"optimizer": {"name": "adam", "lr": 0.01}, "window": 4,
                 "synthetic_gradient": {"target": "backprop", "optimizer": {"name": "adam", "lr": 0.001}}},
    "nodes": {"source": {"role": "source"},
              "a": {"module": "nodes.mlp:Block", "args": {"d_in": 16, "d_out": 8}},
              "b": {"module": "nodes.mlp:Block", "args": {"d_in": 16, "d_out": 8}},
              "join": {"module": "nodes.mlp:Join", "args": {"d_in": [8, 8], "d_out": 8}},
              "head": {"role": "head", "module": "nodes.mlp:Classifier", "args": {"d_in": 8, "classes": 4}}},
    "edges": ["source -> a", "source -> b", "a -> join", "b -> join", "join -> head"],
    "hosts": {"local": {"address": "127.0.0.1", "base_port": 20000}},
}


@pytest.mark.parametrize("mode", ["dni", "cdni", "backprop", "bp_lambda"])
def test_a_whole_dag_runs_to_its_end_on_the_bus_at_window_4(tmp_path, mode):
    """Cores built from a topology, windows deeper than one, target backprop (whose answers
    go upstream late): every node finishes, nothing is rejected or left in flight."""
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump({**TOPOLOGY, "mode": mode}))
    topology = load_topology(path)
    bus = Bus({name: build_core(topology, name, Clock()) for name in topology.nodes})
    bus.start()
    bus.run()
    assert all(c.finished for c in bus.cores.values()), bus.stuck()
    assert {n: c.counters.steps for n, c in bus.cores.items()} == dict.fromkeys(bus.cores, 16)
    assert {n: c.counters.eval_batches for n, c in bus.cores.items()} == dict.fromkeys(bus.cores, 16)
    evals = [r.values for n, r in bus.records if n == "head" and r.values["event"] == "eval"]
    assert len(evals) == 2 and evals[-1]["test_samples"] == 256 and evals[-1]["test_accuracy"] > 0.5
    assert not bus.outside and all(not c.outputs.pending for c in bus.cores.values())


def ticking_head(gather: Gather, tick: int = 3) -> StageCore:
    """A head that steps once every `tick` seqs of its producer `a` (6 features, window 4)."""
    d_in = 6 * tick if gather is Gather.STACK else 6
    stage = make_stage("b", lambda: torch.nn.Sequential(torch.nn.Flatten(), Classifier(d_in, 3)),
                       input_shapes=[(6,)], optimizer={"name": "adam", "lr": 0.01}, rule=None,
                       num_classes=3)
    edge = InEdge("a->b", "a", 4, True, (6,), torch.float32, gather)
    return StageCore(Wiring("b", (edge,), (), 1, True, 8, 3, tick=tick), stage, Clock())


def test_a_node_that_ticks_every_3_steps_on_the_latest_answers_the_others_at_once():
    b = ticking_head(Gather.LATEST)
    answers = [a for seq in range(6) for a in b.receive("a", act(seq, "a->b", d=6))
               if isinstance(a, Send)]
    assert [(a.message.seq, bool(a.message.dh.abs().sum())) for a in answers] == [
        (0, False), (1, False), (2, True), (3, False), (4, False), (5, True)]  # zeros, then dh
    assert answers[2].message.dh.shape == (8, 6) and b.counters.steps == 2
    # Only each group's last seq waits for a step, so its window of 4 reaches 4 groups ahead.
    assert not rejects(b.receive("a", act(15, "a->b", d=6)))
    assert "outside the window [6, 18)" in rejects(b.receive("a", act(18, "a->b", d=6)))[0].reason


def test_a_node_that_ticks_every_3_steps_on_a_stack_answers_each_seq_with_its_slice():
    b = ticking_head(Gather.STACK)
    assert not [a for seq in range(2) for a in b.receive("a", act(seq, "a->b", d=6))
                if isinstance(a, Send)]
    answers = [a.message for a in b.receive("a", act(2, "a->b", d=6)) if isinstance(a, Send)]
    assert [(m.seq, tuple(m.dh.shape)) for m in answers] == [(s, (8, 6)) for s in range(3)]
    b.receive("a", act(3, "a->b", d=6))  # the data ends inside a group: answered, not stepped
    end = b.receive("a", wire.End("a->b", 4))
    assert [a.message.seq for a in end if isinstance(a, Send)] == [3]
    assert b.finished and b.counters.steps == 1 and b.counters.expired == 1
