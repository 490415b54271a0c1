"""Single-process reference trainers: the oracles for the mesh.

It drives the same node cores as the mesh (`dni_mesh.core`), in one process, with ONE batch in
flight: the trainer hands batch t to the first stage as the source would, then delivers every
message the cores send, in the order they send them, until none is left. With one batch in flight
each node sees its events in the same order as in the mesh at window 1 (forward t, the answer
to t, forward t + 1), so both compute the same numbers. Stages are built by
`dni_mesh.build.make_stage`, which the mesh uses too: weights depend only on (seed, node name).

`ChainTrainer` takes a chain built in code (it needs no topology file); `train_in_process`
takes any topology, recurrent nodes and DAGs included, and runs every node's core, the
source's too, exactly as `dni_mesh.build` builds them for the mesh.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dni_mesh import wire
from dni_mesh.build import Plan, build_core, make_stage, module_factory, output_spec, probe
from dni_mesh.core import (Acknowledge, Action, Core, EndEdge, InEdge, OutEdge, Record, Reject, Save,
                           Send, StageCore, Wiring)
from dni_mesh.stage import Stage
from dni_mesh.synthetic import SyntheticGradientConfig
from dni_mesh.topology import Topology
from dni_mesh.update import update_rule

SOURCE = "source"


@dataclass
class ChainNode:
    """One node of the chain: a name and a zero-argument module factory (e.g. a partial).

    The other fields, when set, override the ChainConfig's setting for this node.
    """
    name: str
    make: Callable[[], nn.Module]
    mode: str | None = None
    optimizer: dict | None = None
    synthetic_gradient: SyntheticGradientConfig | None = None
    bp_lambda: float | None = None


@dataclass
class ChainConfig:
    """A chain source -> nodes[0] -> ... -> nodes[-1]; the last node is the head."""
    nodes: list[ChainNode]
    input_shape: tuple[int, ...]      # one sample of the source data
    num_classes: int
    input_dtype: torch.dtype = torch.float32
    mode: str = "dni"                 # "backprop" | "dni" | "cdni" | "bp_lambda"
    optimizer: dict = field(default_factory=lambda: {"name": "adam", "lr": 3e-4})
    synthetic_gradient: SyntheticGradientConfig = field(default_factory=SyntheticGradientConfig)
    bp_lambda: float = 1.0
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 1 << 16         # the largest batch the chain will be given

    @classmethod
    def from_topology(cls, topology: Topology) -> ChainConfig:
        """The reference of a chain topology (source -> stages -> head)."""
        order = chain_names(topology)
        first = topology.nodes[order[0]]
        found = probe(topology)
        return cls(
            nodes=[ChainNode(name, module_factory(topology, name), topology.nodes[name].mode)
                   for name in order],
            input_shape=found.shapes[topology.source], num_classes=found.num_classes,
            input_dtype=found.dtypes[topology.source], mode=topology.mode, optimizer=first.optimizer,
            synthetic_gradient=SyntheticGradientConfig(**first.synthetic_gradient),
            bp_lambda=first.bp_lambda, seed=topology.seed, device=first.device,
            batch_size=topology.data.batch_size)


class Bus:
    """Runs node cores in one process: delivers what they send, first sent first delivered.

    Messages for a node that has no core here are kept in `outside` (the trainer plays the
    source that way). A rejected message is a bug in one process, so it raises.
    """

    def __init__(self, cores: dict[str, Core]):
        self.cores = cores
        self.queue: deque[tuple[str, str, wire.Message]] = deque()
        self.records: list[tuple[str, Record]] = []
        self.saves: list[tuple[str, Save]] = []  # checkpoints the cores asked for, kept in memory
        self.outside: list[tuple[str, str, wire.Message]] = []

    def post(self, node: str, peer: str, message: wire.Message) -> None:
        self.queue.append((node, peer, message))

    def start(self) -> None:
        for name, core in self.cores.items():
            self.carry_out(name, core.advance())

    def run(self) -> None:
        """Deliver until nothing is left to deliver."""
        while self.queue:
            self.deliver()

    def deliver(self) -> None:
        """Deliver the oldest message."""
        node, peer, message = self.queue.popleft()
        core = self.cores.get(node)
        if core is None:
            self.outside.append((node, peer, message))
        else:
            self.carry_out(node, core.receive(peer, message))

    def carry_out(self, node: str, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.post(action.node, node, action.message)
            elif isinstance(action, EndEdge):
                self.post(action.node, node, wire.End(action.edge, action.count))
            elif isinstance(action, Record):
                self.records.append((node, action))
            elif isinstance(action, Save):
                self.saves.append((node, action))
            elif isinstance(action, Reject):
                raise RuntimeError(f"node {node} rejected a {action.kind} from {action.peer}: "
                                   f"{action.reason}")
            elif not isinstance(action, Acknowledge):
                raise TypeError(f"node {node}: unknown action {action!r}")

    def stuck(self) -> str:
        """Every unfinished core and what it waits for."""
        return "; ".join(f"{name} waits for {core.waiting_for()}"
                         for name, core in self.cores.items() if not core.finished)


def chain_names(topology: Topology) -> list[str]:
    """The chain's stages in order (the source excluded).

    The reference takes one optimizer and synthesizer setting for the whole chain, so every
    node must share them; anything else is refused (ValueError) rather than silently compared
    wrongly.
    """
    order = topology.topological_order()[1:]
    chain = [topology.source, *order]
    if [(e.src, e.dst) for e in topology.edges] != list(zip(chain, chain[1:])):
        raise ValueError(f"{topology.path}: the reference trainer needs a chain, got edges "
                         f"{', '.join(str(e) for e in topology.edges)}")
    first = topology.nodes[order[0]]
    for name in order:
        spec = topology.nodes[name]
        same_synthesizer = spec.role == "head" or spec.synthetic_gradient == first.synthetic_gradient
        if not same_synthesizer or (spec.optimizer, spec.bp_lambda) != (first.optimizer, first.bp_lambda):
            raise ValueError(f"{topology.path}: node {name} has its own optimizer or synthetic "
                             "gradient settings; the reference trainer needs them shared")
    return order


@dataclass
class Evaluation:
    loss: float | None       # mean loss per labelled sample; None when no sample had labels
    accuracy: float | None   # over the labelled samples; None when none had labels
    samples: int


class ChainTrainer:
    """Trains a chain of stages through their node cores; records every step's loss."""

    def __init__(self, config: ChainConfig):
        self.config = config
        names = [SOURCE, *(node.name for node in config.nodes)]
        self.edge = f"{SOURCE}->{names[1]}"  # where the trainer feeds its batches
        self.cores: dict[str, StageCore] = {}
        shape, dtype = tuple(config.input_shape), config.input_dtype
        for i, node in enumerate(config.nodes):
            head = i == len(config.nodes) - 1
            stage = self.build(node, shape, head)
            wired = Wiring(
                node.name,
                inputs=(InEdge(f"{names[i]}->{node.name}", names[i], 1, i > 0, shape, dtype),),
                outputs=() if head else (OutEdge(f"{node.name}->{names[i + 2]}", names[i + 2]),),
                window=1, trains=True, batch_size=config.batch_size, num_classes=config.num_classes)
            self.cores[node.name] = StageCore(wired, stage, time.monotonic)
            if not head:
                shape, dtype = output_spec(stage.module, [shape], stage.device)
        self.stages: list[Stage] = [core.stage for core in self.cores.values()]
        self.bus = Bus(dict(self.cores))
        self.head = self.cores[config.nodes[-1].name]
        self.losses: list[float] = []
        self.seq = 0

    def build(self, node: ChainNode, input_shape: tuple[int, ...], head: bool) -> Stage:
        c = self.config
        rule = None
        if not head:
            sg = node.synthetic_gradient or c.synthetic_gradient
            rule = update_rule(node.mode or c.mode, target=sg.target,
                               bp_lambda=c.bp_lambda if node.bp_lambda is None else node.bp_lambda)
        return make_stage(
            node.name, node.make, input_shapes=[input_shape],
            optimizer=node.optimizer or c.optimizer, rule=rule,
            synthetic_gradient=node.synthetic_gradient or c.synthetic_gradient,
            num_classes=c.num_classes, seed=c.seed, device=c.device)

    def feed(self, x: Tensor, y: Tensor, phase: str) -> list[Record]:
        """Hand one batch to the first stage as the source would, and deliver every message
        until none is left; the records the head made meanwhile."""
        seq, self.seq = self.seq, self.seq + 1
        self.bus.post(self.config.nodes[0].name, SOURCE, wire.Activation(self.edge, seq, x, y, phase))
        self.bus.run()
        answers = [m for node, _, m in self.bus.outside if node == SOURCE and m.seq == seq]
        if len(answers) != 1 or len(self.bus.outside) != 1:
            raise RuntimeError(f"reference: seq {seq} was answered {len(answers)} times, not once")
        self.bus.outside.clear()
        records = [r for node, r in self.bus.records if node == self.head.wiring.node]
        self.bus.records.clear()
        return records

    def step(self, x: Tensor, y: Tensor) -> float:
        """Train on one batch; returns the head's loss."""
        records = self.feed(x, y, "train")
        loss = next(r.values["loss"] for r in records if r.values.get("event") == "step")
        self.losses.append(loss)
        return loss

    def train_epoch(self, source, epoch: int) -> list[float]:
        """One pass over source.iterate(epoch); returns this epoch's losses."""
        return [self.step(x, y) for x, y in source.iterate(epoch)]

    def evaluate(self, source: Iterable[tuple[Tensor, Tensor]]) -> Evaluation:
        """Mean loss and accuracy over a data source, through the cores' evaluation path."""
        for x, y in source:
            self.feed(x, y, "eval")
        result = self.head.eval.result()
        self.head.close_eval()
        return Evaluation(result.get("test_loss"), result.get("test_accuracy"), result["test_samples"])



def train_in_process(topology: Topology, found: Plan | None = None,
                     resume: dict[str, dict] | None = None) -> Bus:
    """Run the whole topology, every epoch and evaluation, as node cores on one Bus in this
    process; returns the Bus, whose `records` hold every node's metrics and `saves` its
    checkpoints. At window 1 every node sees its events in the order it sees them in the mesh,
    so the numbers are the mesh's. `resume`: per node, a checkpoint's state to start from (all
    saved before the same seq). Raises RuntimeError naming what each node waits for if the run
    cannot finish."""
    found = found or probe(topology)
    resume = resume or {}
    bus = Bus({name: build_core(topology, name, time.monotonic, found, resume.get(name))
               for name in topology.nodes})
    bus.start()
    bus.run()
    if not all(core.finished for core in bus.cores.values()):
        raise RuntimeError(f"{topology.path}: the in-process run cannot finish: {bus.stuck()}")
    return bus
