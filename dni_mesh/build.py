"""From settings to the objects that run a node: seeded stages, data, wiring and node cores.

Every node process, and the single-process reference built from the same file, goes through
these functions, so a node's weights depend only on (topology seed, node name) wherever it runs,
and a node's core checks messages against the same wiring in the mesh and in the reference.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from dni_mesh.core import Batch, Clock, EpochEnd, InEdge, OutEdge, SourceCore, StageCore, Wiring
from dni_mesh.objective import Classification
from dni_mesh.stage import Stage
from dni_mesh.synthetic import SyntheticGradientConfig, Synthesizer, make_optimizer
from dni_mesh.topology import Topology, resolve_import
from dni_mesh.update import SyntheticGradient, UpdateRule, update_rule


def node_seed(seed: int, name: str) -> int:
    """A stable per-node seed (crc32, unlike Python's salted hash())."""
    return zlib.crc32(f"{seed}/{name}".encode())


def output_spec(module: nn.Module, input_shapes: Sequence[tuple[int, ...]],
                device: torch.device | str = "cpu") -> tuple[tuple[int, ...], torch.dtype]:
    """One sample's output shape and the output dtype, from a dry run in eval mode (no
    statistics change)."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = module(*[torch.zeros(2, *shape, device=device) for shape in input_shapes])
    module.train(was_training)
    return tuple(out.shape[1:]), out.dtype


def make_stage(name: str, make_module: Callable[[], nn.Module], *,
               input_shapes: Sequence[tuple[int, ...]], optimizer: dict,
               rule: UpdateRule | None, synthetic_gradient: SyntheticGradientConfig | None = None,
               num_classes: int, seed: int = 0, window: int = 1,
               device: torch.device | str = "cpu") -> Stage:
    """A node's Stage: module, optimizer and synthesizer seeded from (seed, name). rule None
    makes a head, which owns the classification objective.

    The module is built under node_seed(seed, name) and the synthesizer under
    node_seed(seed, name + "/synthesizer"), both on the CPU and inside a forked RNG, so the
    caller's random state is untouched and changing one never shifts the other's weights.
    input_shapes are per-sample input shapes, used to size the synthesizer. A SyntheticGradient
    rule decides whether the synthesizer is conditioned; BPLambda keeps the config's choice.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(node_seed(seed, name))
        module = make_module()
    synthesizer = sg_optimizer = None
    if rule is not None and rule.synthetic:
        sg_config = synthetic_gradient or SyntheticGradientConfig()
        if isinstance(rule, SyntheticGradient):
            sg_config = replace(sg_config, conditioned=rule.conditioned)
        shape, _ = output_spec(module, input_shapes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(node_seed(seed, name + "/synthesizer"))
            synthesizer = Synthesizer(shape, num_classes, sg_config)
        sg_optimizer = make_optimizer(synthesizer.parameters(), sg_config.optimizer)
    module.to(device)
    if synthesizer is not None:
        synthesizer.to(device)
    objective = Classification(num_classes) if rule is None else None
    return Stage(name, module, make_optimizer(module.parameters(), optimizer), rule=rule,
                 objective=objective, synthesizer=synthesizer, sg_optimizer=sg_optimizer,
                 window=window, device=device)


# From a topology.

def build_source(topology: Topology, split: str):
    """The topology's data source for "train" (shuffled by the topology seed) or "test"."""
    data = topology.data
    kwargs = dict(data.args, split=split, batch_size=data.batch_size, shuffle=split == "train",
                  seed=topology.seed)
    if data.data_dir is not None:
        kwargs["data_dir"] = str(data.data_dir)
    return resolve_import(data.source, topology.root)(**kwargs)


def source_batches(topology: Topology) -> Iterator[Batch | EpochEnd]:
    """What the source sends: every epoch's training batches, then the test set at each
    evaluation point."""
    data = topology.data
    train, test = build_source(topology, "train"), build_source(topology, "test")
    for epoch in range(1, data.epochs + 1):
        train.set_epoch(epoch - 1)
        for batch, (x, y) in enumerate(train):
            if data.limit is not None and batch >= data.limit:
                break
            yield Batch(x, y, "train")
        yield EpochEnd(epoch)
        if epoch == data.epochs or (data.eval_every and epoch % data.eval_every == 0):
            for x, y in test:
                yield Batch(x, y, "eval")


def module_factory(topology: Topology, name: str) -> Callable[[], nn.Module]:
    spec = topology.nodes[name]
    return partial(resolve_import(spec.module, topology.root), **spec.args)


@dataclass(frozen=True)
class Probe:
    """Every node's per-sample output shape and dtype, and the number of classes."""
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    num_classes: int


def probe(topology: Topology) -> Probe:
    """Found by a dry run of each module (eval mode, two zero samples) in topological order;
    the source's comes from a test-split data source, which is small to load."""
    test = build_source(topology, "test")
    x, _ = next(iter(test))
    shapes, dtypes = {topology.source: tuple(test.sample_shape)}, {topology.source: x.dtype}
    for name in topology.topological_order():
        if topology.nodes[name].role == "stage":
            inputs = [shapes[e.src] for e in topology.inputs(name)]
            shapes[name], dtypes[name] = output_spec(module_factory(topology, name)(), inputs)
    return Probe(shapes, dtypes, test.num_classes)


def node_rule(topology: Topology, name: str) -> UpdateRule | None:
    """The update rule of a stage; None for the source and the heads (they have none)."""
    spec = topology.nodes[name]
    if spec.role != "stage":
        return None
    return update_rule(spec.mode, target=spec.synthetic_gradient["target"],
                       bp_lambda=spec.bp_lambda)


def node_window(topology: Topology, name: str) -> int:
    """Outputs in flight at most: the node's window, 1 where its out-edges are locked."""
    spec = topology.nodes[name]
    locked = spec.mode is not None and update_rule(spec.mode).locked
    return 1 if locked else spec.window


def wiring(topology: Topology, name: str, found: Probe) -> Wiring:
    spec = topology.nodes[name]
    inputs = tuple(InEdge(e.name, e.src, node_window(topology, e.src),
                          topology.nodes[e.src].role != "source", found.shapes[e.src],
                          found.dtypes[e.src])
                   for e in topology.inputs(name))
    outputs = tuple(OutEdge(e.name, e.dst) for e in topology.outputs(name))
    return Wiring(name, inputs, outputs, node_window(topology, name), spec.role != "source",
                  topology.data.batch_size, found.num_classes)


def build_stage(topology: Topology, name: str, found: Probe | None = None) -> Stage:
    """The Stage of a stage or head node, seeded from (topology seed, node name)."""
    spec = topology.nodes[name]
    found = found or probe(topology)
    return make_stage(
        name, module_factory(topology, name),
        input_shapes=[found.shapes[e.src] for e in topology.inputs(name)],
        optimizer=spec.optimizer, rule=node_rule(topology, name),
        synthetic_gradient=SyntheticGradientConfig(**spec.synthetic_gradient),
        num_classes=found.num_classes, seed=topology.seed, window=node_window(topology, name),
        device=spec.device)


def largest_tensor(topology: Topology, name: str, found: Probe) -> int:
    """The most bytes one tensor sent to this node can legitimately hold: a batch of the
    activations of its in-edges, of the gradients of its own output, or of labels. A receiver
    bounds what a peer can make it allocate by this, not by the protocol's 1 GiB."""
    batch = topology.data.batch_size
    sizes = [8 * batch]  # int64 labels
    for node in [e.src for e in topology.inputs(name)] + ([name] if topology.outputs(name) else []):
        shape, dtype = found.shapes[node], found.dtypes[node]
        sizes.append(batch * math.prod(shape) * dtype.itemsize)
    return max(sizes)


def build_core(topology: Topology, name: str, clock: Clock,
               found: Probe | None = None) -> SourceCore | StageCore:
    """The node core of one node of the topology, with its stage or its data."""
    found = found or probe(topology)
    wired = wiring(topology, name, found)
    if topology.nodes[name].role == "source":
        return SourceCore(wired, source_batches(topology), clock)
    return StageCore(wired, build_stage(topology, name, found), clock)
