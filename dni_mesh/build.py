"""From a topology's node specs to the objects that run them: data sources and stages.

Every node process, and the single-process reference built from the same file, goes through
these functions, so a node's weights depend only on (topology seed, node name) wherever it runs.
"""

from __future__ import annotations

from functools import partial

from dni_mesh.reference import ChainConfig, NodeSpec, build_stage as build_seeded_stage, output_shape
from dni_mesh.stage import Stage, StageConfig
from dni_mesh.synthetic import SyntheticGradientConfig
from dni_mesh.topology import Topology, resolve_import


def build_source(topology: Topology, split: str):
    """The topology's data source for "train" (shuffled by the topology seed) or "test"."""
    data = topology.data
    kwargs = dict(data.args, split=split, batch_size=data.batch_size, shuffle=split == "train",
                  seed=topology.seed)
    if data.data_dir is not None:
        kwargs["data_dir"] = str(data.data_dir)
    return resolve_import(data.source, topology.root)(**kwargs)


def module_factory(topology: Topology, name: str):
    spec = topology.nodes[name]
    return partial(resolve_import(spec.module, topology.root), **spec.args)


def shapes(topology: Topology) -> tuple[dict[str, tuple[int, ...]], int]:
    """Every node's per-sample output shape, and the number of classes.

    Found by a dry run of each module (eval mode, two zero samples) in topological order; the
    source's shape comes from a test-split data source, which is small to load.
    """
    test = build_source(topology, "test")
    out = {topology.source: tuple(test.sample_shape)}
    for name in topology.topological_order():
        spec = topology.nodes[name]
        if spec.role == "stage":
            inputs = [out[e.src] for e in topology.inputs(name)]
            out[name] = output_shape(module_factory(topology, name)(), inputs)
    return out, test.num_classes


def stage_config(topology: Topology, name: str) -> StageConfig:
    spec = topology.nodes[name]
    # A head has no out-edge and so no mode; its Stage ignores the mode it is given.
    return StageConfig(mode=spec.mode or topology.mode, bp_lambda=spec.bp_lambda,
                       max_pending=spec.max_pending)


def build_stage(topology: Topology, name: str) -> Stage:
    """The Stage of a stage or head node, seeded from (topology seed, node name)."""
    spec = topology.nodes[name]
    out, num_classes = shapes(topology)
    return build_seeded_stage(
        name, module_factory(topology, name),
        input_shapes=[out[e.src] for e in topology.inputs(name)],
        optimizer=spec.optimizer, config=stage_config(topology, name),
        synthetic_gradient=SyntheticGradientConfig(**spec.synthetic_gradient),
        head=spec.role == "head", num_classes=num_classes, seed=topology.seed, device=spec.device)


def chain_config(topology: Topology) -> ChainConfig:
    """The single-process reference of a chain topology (source -> stages -> head).

    The reference takes one optimizer and synthesizer setting for the whole chain, so every
    node must share them; anything else is refused rather than silently compared wrongly.
    """
    order = topology.topological_order()[1:]
    chain = [topology.source, *order]
    links = [(e.src, e.dst) for e in topology.edges]
    if links != list(zip(chain, chain[1:])):
        raise ValueError(f"{topology.path}: the reference trainer needs a chain, got edges "
                         f"{', '.join(str(e) for e in topology.edges)}")
    first = topology.nodes[order[0]]
    for name in order:
        spec = topology.nodes[name]
        same_synthesizer = spec.role == "head" or spec.synthetic_gradient == first.synthetic_gradient
        if not same_synthesizer or (spec.optimizer, spec.bp_lambda, spec.max_pending) != \
                (first.optimizer, first.bp_lambda, first.max_pending):
            raise ValueError(f"{topology.path}: node {name} has its own optimizer or synthetic "
                             "gradient settings; the reference trainer needs them shared")
    test = build_source(topology, "test")
    return ChainConfig(
        nodes=[NodeSpec(name, module_factory(topology, name), topology.nodes[name].mode)
               for name in order],
        input_shape=tuple(test.sample_shape), num_classes=test.num_classes, mode=topology.mode,
        optimizer=first.optimizer,
        synthetic_gradient=SyntheticGradientConfig(**first.synthetic_gradient),
        bp_lambda=first.bp_lambda, max_pending=first.max_pending, seed=topology.seed,
        device=first.device)
