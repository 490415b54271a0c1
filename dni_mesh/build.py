"""From settings to the objects that run a node: the mesh's plan, seeded stages, data, wiring
and node cores.

Every node process, and the single-process reference built from the same file, goes through
these functions, so a node's weights depend only on (topology seed, node name) wherever it runs,
and a node's core checks messages against the same wiring in the mesh and in the reference.

The plan (`resolve_plan`) is what each node sends, found once by building every module and
dry-running it on what its in-edges will carry; it is where a mesh that cannot run is refused,
naming the node. `dni-mesh validate` and the launcher resolve it before anything starts; the
launcher hands it to the node processes (`node_plan`), which then build only their own module.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import socket
import traceback
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from dni_mesh import wire
from dni_mesh.checkpoint import CheckpointPolicy
from dni_mesh.core import (Batch, Clock, EdgeKind, EpochEnd, Gather, InEdge, OutEdge, SourceCore,
                           StageCore, Wiring)
from dni_mesh.language_model import LanguageModel
from dni_mesh.objective import Classification, Objective
from dni_mesh.recurrent import RecurrentStage, flat
from dni_mesh.stage import Stage
from dni_mesh.synthetic import SyntheticGradientConfig, SyntheticInput, Synthesizer, make_optimizer
from dni_mesh.topology import Topology, TopologyError, resolve_import
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
               device: torch.device | str = "cpu",
               output_shape: tuple[int, ...] | None = None,
               time: str | None = None, input_dtypes: Sequence[torch.dtype] | None = None,
               label_shape: tuple[int, ...] = (), objective: Objective | None = None,
               synthetic_input: dict | None = None, source_shape: tuple[int, ...] = ()) -> Stage:
    """A node's Stage: module, optimizer and synthesizer seeded from (seed, name). rule None
    makes a head, which owns `objective`, or else the one its labels call for
    (`objective_for`).

    The module is built under node_seed(seed, name) and the synthesizer under
    node_seed(seed, name + "/synthesizer"), both on the CPU and inside a forked RNG, so the
    caller's random state is untouched and changing one never shifts the other's weights.
    The synthesizer is sized by output_shape, one sample of the module's output, or when that
    is None by a dry run on float32 input_shapes (per-sample input shapes).

    time (None, "bptt" or "dni") makes a RecurrentStage: the module is recurrent
    (`dni_mesh.recurrent`), its synthesizer reads one time step of the output, and with "dni"
    a time synthesizer (seeded from name + "/time-synthesizer", sized by a dry run on
    input_dtypes) predicts the gradient beyond each chunk.

    synthetic_input ({"hidden", "width", "optimizer"}) gives a feed-forward stage a synthetic
    input I (complete unlock) from one sample of the source's data (source_shape) to its one
    input, seeded from name + "/synthetic-input".
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(node_seed(seed, name))
        module = make_module()
    sg_config = synthetic_gradient or SyntheticGradientConfig()
    if time is not None and output_shape is None:
        raise ValueError(f"stage {name}: a recurrent stage needs output_shape (the plan's)")
    synthesizer = sg_optimizer = None
    if rule is not None and rule.synthetic:
        shape = output_shape if output_shape is not None else output_spec(module, input_shapes)[0]
        synthesizer, sg_optimizer = seeded_synthesizer(  # a recurrent one: per time step
            shape[-1:] if time else shape, num_classes, synthesizer_config(rule, sg_config),
            node_seed(seed, name + "/synthesizer"), 1 if time else math.prod(label_shape))
    module.to(device)
    if rule is None:
        objective = objective or objective_for(label_shape, num_classes)
    settings = dict(rule=rule, objective=objective, synthesizer=synthesizer,
                    sg_optimizer=sg_optimizer, window=window, device=device)
    if time is None:
        if synthetic_input is not None:
            settings.update(zip(("synthetic_input", "input_optimizer"), seeded_synthetic_input(
                synthetic_input, source_shape, input_shapes[0], node_seed(seed, name + "/synthetic-input"))))
        return Stage(name, module, make_optimizer(module.parameters(), optimizer), **settings)
    clock_synthesizer = clock_optimizer = None
    if time == "dni":
        dtypes = input_dtypes or [torch.float32] * len(input_shapes)
        size = state_size(module, input_shapes, dtypes, device)
        clock_synthesizer, clock_optimizer = seeded_synthesizer(
            (size,), num_classes, replace(sg_config, conditioned=False),
            node_seed(seed, name + "/time-synthesizer"))
    return RecurrentStage(name, module, make_optimizer(module.parameters(), optimizer),
                          time_synthesizer=clock_synthesizer, time_sg_optimizer=clock_optimizer,
                          **settings)


def seeded_synthesizer(shape: tuple[int, ...], num_classes: int,
                       config: SyntheticGradientConfig, seed: int, labels_per_sample: int = 1
                       ) -> tuple[Synthesizer, torch.optim.Optimizer]:
    """A synthesizer built under its own seed (inside a forked RNG), and its optimizer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        synthesizer = Synthesizer(shape, num_classes, config, labels_per_sample)
    return synthesizer, make_optimizer(synthesizer.parameters(), config.optimizer)


def seeded_synthetic_input(config: dict, source_shape: tuple[int, ...],
                           target_shape: tuple[int, ...], seed: int
                           ) -> tuple[SyntheticInput, torch.optim.Optimizer]:
    """A synthetic input I (`synthetic_input`'s hidden, width, optimizer) built under its own
    seed (inside a forked RNG), and its optimizer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SyntheticInput(source_shape, target_shape, config["hidden"], config["width"])
    return model, make_optimizer(model.parameters(), config["optimizer"])


def state_size(module: nn.Module, input_shapes: Sequence[tuple[int, ...]],
               input_dtypes: Sequence[torch.dtype], device: torch.device | str = "cpu") -> int:
    """Numbers per sample in a recurrent module's state: what its time synthesizer reads."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        _, state = module(*[torch.zeros(DRY_BATCH, *shape, dtype=dtype, device=device)
                            for shape, dtype in zip(input_shapes, input_dtypes, strict=True)], None)
    module.train(was_training)
    return flat(state).shape[1]


def node_objective(topology: Topology, name: str, label_shape: tuple[int, ...],
                   num_classes: int) -> Objective:
    """A head's objective: the topology's class for it, or the one its labels call for."""
    spec = topology.nodes[name]
    if spec.objective is None:
        return objective_for(label_shape, num_classes)
    return resolve_import(spec.objective, topology.root)(**spec.objective_args)


def input_shape(topology: Topology, edge, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """One sample of what the edge's consumer takes from it (`shapes`: each node's output):
    a "stack" edge into a node that ticks every k seqs brings k of the producer's samples."""
    shape = shapes[edge.src]
    return (topology.nodes[edge.dst].tick, *shape) if edge.gather == "stack" else shape


def objective_for(label_shape: tuple[int, ...], num_classes: int) -> Objective:
    """What a head minimises: a class per sample (classification), or the next token at every
    time step of a chunk (a language model: labels [T] per sample)."""
    return LanguageModel() if label_shape else Classification(num_classes)


def synthesizer_config(rule: UpdateRule,
                       config: SyntheticGradientConfig) -> SyntheticGradientConfig:
    """A SyntheticGradient rule decides whether the synthesizer is conditioned; BPLambda keeps
    the config's choice."""
    return replace(config, conditioned=rule.conditioned) if isinstance(rule, SyntheticGradient) \
        else config


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
    evaluation point. The test split is loaded at the first evaluation, not before the first
    training batch."""
    data = topology.data
    train, test = build_source(topology, "train"), None
    for epoch in range(1, data.epochs + 1):
        train.set_epoch(epoch - 1)
        for batch, (x, y) in enumerate(train):
            if data.limit is not None and batch >= data.limit:
                break
            yield Batch(x, y, "train")
        yield EpochEnd(epoch)
        if epoch == data.epochs or (data.eval_every and epoch % data.eval_every == 0):
            if test is None:
                test = build_source(topology, "test")
            for x, y in test:
                yield Batch(x, y, "eval")


def module_factory(topology: Topology, name: str) -> Callable[[], nn.Module]:
    spec = topology.nodes[name]
    return partial(resolve_import(spec.module, topology.root), **spec.args)


# The plan: what each node sends, resolved once for the whole mesh.

DRY_BATCH = 2
"""Samples in a dry run: two, so batch norm in eval mode and a batch dimension both show."""
WIRE_FLOATS = {name: dtype for name, dtype in wire.DTYPES.items() if dtype.is_floating_point}
"""The dtypes a stage may send: floating (gradients come back for them), carried by the wire."""
PLAN_VERSION = 2
_HERE, _TORCH = str(Path(__file__).parent), str(Path(torch.__file__).parent)


@dataclass(frozen=True)
class Plan:
    """Every node's per-sample output shape and dtype (the source's: one sample of its data; a
    head's: its class scores), and the number of classes. It is all a node needs to know of
    the others to build its own stage and check what its in-edges carry (`wiring`)."""
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    num_classes: int
    label_shape: tuple[int, ...] = ()  # one sample's labels: () a class, (T,) a chunk's tokens

    def describe(self, name: str) -> str:
        """What `name` sends, e.g. "float32[256]"."""
        return f"{wire_name(self.dtypes[name])}[{','.join(map(str, self.shapes[name]))}]"

    def save(self, path: Path, topology: Topology) -> None:
        """Write the plan as JSON, for `node_plan` in the node processes of this topology."""
        outputs = {name: {"shape": list(self.shapes[name]), "dtype": wire_name(self.dtypes[name])}
                   for name in self.shapes}
        Path(path).write_text(json.dumps({
            "plan": PLAN_VERSION, "topology": str(topology.path), "digest": plan_digest(topology),
            "num_classes": self.num_classes, "label_shape": list(self.label_shape),
            "outputs": outputs}, indent=1) + "\n")




def wire_name(dtype: torch.dtype) -> str:
    return next((name for name, d in wire.DTYPES.items() if d == dtype), str(dtype))


def plan_digest(topology: Topology) -> str:
    """A digest of what decides the plan (data source, node modules and args, edges), so a
    node refuses a plan made for another file or other `--set`s."""
    decisive = {"data": [topology.data.source, topology.data.args],
                "nodes": {n.name: [n.role, n.module, n.args, n.time, n.tick, n.objective,
                                   n.objective_args] + ([n.synthetic_input] if n.synthetic_input else [])
                          for n in topology.nodes.values()},
                "edges": [[e.name, e.gather] for e in topology.edges]}  # a trigger's: by its node
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=repr).encode()).hexdigest()


def load_plan(path: Path, topology: Topology) -> Plan:
    """The plan `Plan.save` wrote for this topology; TopologyError if it is unreadable or was
    made for a different one."""
    def refuse(problem: str) -> TopologyError:
        return TopologyError(f"{problem}; leave --plan out and the node resolves the plan itself",
                             file=str(path))

    try:
        saved = json.loads(Path(path).read_text())
        if saved.get("plan") != PLAN_VERSION:
            raise refuse(f"plan version {saved.get('plan')!r}, this code reads {PLAN_VERSION}")
        if saved["digest"] != plan_digest(topology):
            raise refuse(f"the plan was made for {saved.get('topology')} with other nodes, edges "
                         f"or data than {topology.path} (and its --set options) has")
        outputs = saved["outputs"]
        missing = [name for name in topology.nodes if name not in outputs]
        if missing:
            raise refuse(f"no output for {', '.join(missing)}")
        return Plan({name: tuple(int(n) for n in out["shape"]) for name, out in outputs.items()},
                    {name: wire.DTYPES[out["dtype"]] for name, out in outputs.items()},
                    int(saved["num_classes"]), tuple(int(n) for n in saved["label_shape"]))
    except TopologyError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise refuse(f"cannot read the plan: {type(exc).__name__}: {exc}") from None


def device_problem(device: str) -> str | None:
    """Why `device` cannot run a module on this machine, or None when it can."""
    where = torch.device(device)
    if where.type == "cuda":
        if not torch.cuda.is_available():
            return "this machine has no CUDA device (torch.cuda.is_available() is False)"
        count = torch.cuda.device_count()
        if (where.index or 0) >= count:
            return f"this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
    return None


def check_device(topology: Topology, name: str) -> None:
    device = topology.nodes[name].device
    if (problem := device_problem(device)) is not None:
        raise topology.error(("nodes", name, "device"), f"node {name}: device {device!r}: "
                             f"{problem}; set nodes.{name}.device: cpu, or run {name} where "
                             f"{device} exists")


def nodes_here(topology: Topology) -> list[str]:
    """The nodes whose host address this machine has (it can bind it): the ones whose device
    `validate` can check here. `dni-mesh run` starts every node here and checks all."""
    here = {}
    for host in topology.hosts.values():
        with socket.socket() as sock:
            try:
                sock.bind((host.address, 0))
                here[host.name] = True
            except OSError:
                here[host.name] = False
    return [name for name, node in topology.nodes.items() if here[node.host]]


def resolve_plan(topology: Topology, devices: Iterable[str] | None = None) -> Plan:
    """The mesh's plan, found by building every stage and head and dry-running it, in
    topological order, on what its in-edges will carry: DRY_BATCH zero samples of each
    producer's shape and dtype, as module(*inputs) in edge order, in eval mode, on the CPU.
    The source's sample comes from its test split. `devices`: the nodes whose device must
    exist on this machine (None: all of them).

    Raises TopologyError at the offending node's key, naming the node, its module and what
    it got, when a module cannot be built or run on its inputs, returns no batch of a floating
    dtype the wire carries, a head gives no [batch, num_classes] scores, or a synthesizer
    cannot be built or run on its stage's output.

    The dtype rule: a stage may send any floating dtype the wire carries (WIRE_FLOATS) that
    everything computing on it at run time takes, each consumer's module and its own
    synthesizer (float32, in every synthetic-gradient mode), since the core requires each
    in-edge to carry exactly its producer's dtype and nothing casts on the way. When a consumer
    refuses an input that it takes as float32, the producer is blamed, not the consumer. In
    practice: float32 everywhere, or another dtype only out of a backprop-mode stage into
    modules built for it.
    """
    for name in topology.nodes if devices is None else devices:
        check_device(topology, name)
    source = topology.source
    shape, dtype, num_classes, label_shape = _source_sample(topology)
    shapes, dtypes = {source: shape}, {source: dtype}
    with torch.random.fork_rng(devices=[]):  # building modules must not move the caller's RNG
        for name in topology.topological_order():
            if name != source:
                shapes[name], dtypes[name] = _dry_run(topology, name, shapes, dtypes, num_classes,
                                                      label_shape)
    return Plan(shapes, dtypes, num_classes, label_shape)


def probe(topology: Topology) -> Plan:
    """The plan without device checks: for drivers that run every module in this process
    (the reference, GPipe, RDMs), which place them themselves."""
    return resolve_plan(topology, devices=())


def node_plan(topology: Topology, name: str, path: Path | None = None) -> Plan:
    """The plan a node process starts from: the launcher's file when given, so that the node
    builds only its own module; else resolved here, as `validate` does (a node started by
    hand). Either way the node's own device must exist here."""
    if path is None:
        return resolve_plan(topology, devices=[name])
    check_device(topology, name)
    return load_plan(path, topology)


def _source_sample(topology: Topology
                   ) -> tuple[tuple[int, ...], torch.dtype, int, tuple[int, ...]]:
    """One sample's shape and dtype, the number of classes and one sample's label shape, from
    the test split."""
    data = topology.data
    try:
        test = build_source(topology, "test")
        x, y = next(iter(test))
        shape, num_classes = tuple(test.sample_shape), int(test.num_classes)
        label_shape = tuple(y.shape[1:])
    except Exception as exc:
        raise topology.error(("data", "source"), f"the data source {data.source} gives no test "
                             f"batch: {_why(exc)}") from exc
    if not isinstance(x, torch.Tensor) or x.dtype not in wire.DTYPES.values():
        got = wire_name(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
        raise topology.error(("data", "source"), f"the data source {data.source} gives {got} "
                             f"samples; the wire carries {', '.join(wire.DTYPES)}")
    _check_groups(topology, len(test))
    return shape, x.dtype, num_classes, label_shape


def _check_groups(topology: Topology, test_batches: int) -> None:
    """A node that ticks every k seqs steps on groups of k consecutive seqs, counted across
    training and evaluation batches alike: a group must never hold both, so every epoch's
    training batches and the test split must each be a multiple of k batches."""
    ticks = {name: spec.tick for name, spec in topology.nodes.items() if spec.tick > 1}
    if not ticks:
        return
    train = len(build_source(topology, "train"))
    if topology.data.limit is not None:
        train = min(train, topology.data.limit)
    for name, tick in ticks.items():
        for split, batches in (("training", train), ("test", test_batches)):
            if batches % tick:
                raise topology.error(("nodes", name, "tick"), (
                    f"node {name} ticks every {tick} seqs, but the {split} split has {batches} "
                    f"batches, not a multiple of {tick}: a group would hold training and "
                    "evaluation batches (set data.limit, or the source's size)"))


def _show(x: torch.Tensor) -> str:
    return f"{wire_name(x.dtype)}[{','.join(map(str, x.shape))}]"


def _why(exc: BaseException) -> str:
    """The exception on one line, with the innermost line of user code it came from."""
    text = " ".join(str(exc).split()) or "(no message)"
    if len(text) > 600:
        text = text[:600] + " ..."
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith((_HERE, _TORCH))]
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {text}{where}"


def _forward(module: Callable, inputs: list[torch.Tensor]) -> tuple[object, Exception | None]:
    try:
        with torch.no_grad():
            return module(*inputs), None
    except Exception as exc:
        return None, exc


def _dry_run(topology: Topology, name: str, shapes: dict[str, tuple[int, ...]],
             dtypes: dict[str, torch.dtype], num_classes: int,
             label_shape: tuple[int, ...]) -> tuple[tuple[int, ...], torch.dtype]:
    """Build node `name`'s module and run it as `resolve_plan` says (a recurrent one from its
    zero state, module(*inputs, None)); its output's spec."""
    spec = topology.nodes[name]
    who = f"{name} ({spec.module})"
    producers = [e.src for e in topology.inputs(name)]
    inputs = [torch.zeros(DRY_BATCH, *input_shape(topology, e, shapes), dtype=dtypes[e.src])
              for e in topology.inputs(name)]
    got = f"got inputs {', '.join(map(_show, inputs))}"
    try:
        module = module_factory(topology, name)()
    except Exception as exc:
        raise topology.error(("nodes", name, "args" if spec.args else "module"),
                             f"{who} cannot be built from args {spec.args}: {_why(exc)}") from exc
    if not isinstance(module, nn.Module):
        raise topology.error(("nodes", name, "module"),
                             f"{who} gives a {type(module).__name__}, not a torch.nn.Module")
    module.eval()
    recurrent = spec.time is not None
    out, error = _forward(module, inputs + [None] if recurrent else inputs)
    if error is not None:
        _blame_producer(topology, who, producers, inputs, module, got, error)
        raise topology.error(("nodes", name, "module"), f"{who} {got}: {_why(error)}") from error
    if recurrent:
        out = _recurrent_output(topology, name, who, got, out)
        rule = node_rule(topology, name)
        if rule is not None and not RecurrentStage.supports(rule):
            raise topology.error(("nodes", name, "time"), (
                f"{name}: a recurrent node (time: {spec.time}) takes the modes backprop, dni and "
                f"cdni with bootstrap synthesizer targets, not {rule}"))
    if not isinstance(out, torch.Tensor):
        raise topology.error(("nodes", name, "module"), f"{who} {got}: returned a "
                             f"{type(out).__name__}; a node's module returns one tensor")
    sent = f"{who} {got} and returned {_show(out)}"
    if out.dim() == 0 or out.shape[0] != DRY_BATCH:
        raise topology.error(("nodes", name, "module"), f"{sent}: the first dimension of the "
                             f"output must be the batch ({DRY_BATCH} here)")
    labels = torch.zeros(DRY_BATCH, *label_shape, dtype=torch.int64)
    if spec.role == "head":
        scores = [DRY_BATCH, *label_shape, num_classes]
        if spec.objective is None and list(out.shape) != scores:
            raise topology.error(("nodes", name, "module"), (
                f"{sent}: a head gives [batch, {', '.join(map(str, scores[1:]))}] class scores "
                f"(the data has {num_classes} classes"
                f"{f' and labels {list(label_shape)} per sample' if label_shape else ''})"))
        try:
            objective = node_objective(topology, name, label_shape, num_classes)
        except Exception as exc:
            raise topology.error(("nodes", name, "objective"), f"{name}'s objective "
                                 f"{spec.objective or 'for its labels'} with arguments "
                                 f"{spec.objective_args} cannot be built: {_why(exc)}") from exc
        try:  # all three, as the head's steps and evaluations call them
            objective.loss(out, labels)
            objective.correct(out, labels)
            objective.scored(labels)
        except Exception as exc:
            raise topology.error(("nodes", name, "module"), f"{sent}, which the "
                                 f"{type(objective).__name__} objective cannot take: {_why(exc)}") from exc
    elif out.dtype not in WIRE_FLOATS.values():
        raise topology.error(("nodes", name, "module"), f"{sent}: a stage sends a floating dtype "
                             f"the wire carries ({', '.join(WIRE_FLOATS)})")
    elif recurrent:  # its synthesizer reads one time step
        _dry_run_synthesizer(topology, name, who, out.reshape(-1, out.shape[-1]),
                             labels.reshape(-1), num_classes)
    else:
        _dry_run_synthesizer(topology, name, who, out, labels, num_classes)
    if spec.synthetic_input is not None:
        _dry_run_synthetic_input(topology, name, shapes[topology.source], inputs[0])
    return tuple(out.shape[1:]), out.dtype


def _dry_run_synthetic_input(topology: Topology, name: str, source_shape: tuple[int, ...],
                             real: torch.Tensor) -> None:
    """Build the node's synthetic input and check it predicts its input's shape from the data."""
    config = topology.nodes[name].synthetic_input
    try:
        model, _ = seeded_synthetic_input(config, source_shape, tuple(real.shape[1:]), 0)
        guess, error = _forward(model.eval(), [torch.zeros(DRY_BATCH, *source_shape)])
    except Exception as exc:
        guess, error = None, exc
    if error is not None or guess.shape != real.shape or guess.dtype != real.dtype:
        why = _why(error) if error is not None else f"it gives {_show(guess)}"
        raise topology.error(("nodes", name, "synthetic_input"), (
            f"{name}: no synthetic input from the source's data [{', '.join(map(str, source_shape))}]"
            f" to its input {_show(real)}: {why}")) from error


def _is_state(state: object) -> bool:
    return isinstance(state, torch.Tensor) or (isinstance(state, tuple) and bool(state) and all(
        isinstance(t, torch.Tensor) for t in state))


def _recurrent_output(topology: Topology, name: str, who: str, got: str,
                      out: object) -> object:
    """The output y of a recurrent module's (y, state), after checking it returned that."""
    if not (isinstance(out, tuple) and len(out) == 2 and _is_state(out[1])):
        raise topology.error(("nodes", name, "time"), (
            f"{who} {got}: returned {type(out).__name__}; a recurrent module (time: "
            f"{topology.nodes[name].time}) returns (output, state), the state a tensor or a "
            "tuple of tensors"))
    return out[0]


def _blame_producer(topology: Topology, who: str, producers: list[str],
                    inputs: list[torch.Tensor], module: nn.Module, got: str,
                    error: Exception) -> None:
    """Raise at the producer when the consumer takes as float32 what it refused in the
    producer's dtype: the producer's choice of dtype is the mistake."""
    odd = [i for i, (p, x) in enumerate(zip(producers, inputs))
           if x.dtype != torch.float32 and topology.nodes[p].role == "stage"]
    if not odd:
        return
    cast = [x.float() if i in odd else x for i, x in enumerate(inputs)]
    _, again = _forward(module, cast)
    if again is None:
        name = producers[odd[0]]
        raise topology.error(("nodes", name, "module"), (
            f"{name} ({topology.nodes[name].module}) sends {_show(inputs[odd[0]])}, which its "
            f"consumer {who} cannot take ({who} {got}: {_why(error)}); it takes float32")) \
            from error


def _dry_run_synthesizer(topology: Topology, name: str, who: str, out: torch.Tensor,
                         labels: torch.Tensor, num_classes: int) -> None:
    """Build the stage's synthesizer, when its rule has one, and run it on the output."""
    rule = node_rule(topology, name)
    if rule is None or not rule.synthetic:
        return
    key = ("nodes", name, "synthetic_gradient")
    try:
        config = synthesizer_config(rule, SyntheticGradientConfig(
            **topology.nodes[name].synthetic_gradient))
        synthesizer = Synthesizer(tuple(out.shape[1:]), num_classes, config,
                                  labels[0].numel()).eval()
    except Exception as exc:
        raise topology.error(key, f"{name}: no synthesizer for its output {_show(out)}: "
                             f"{_why(exc)}") from exc
    conditioned = labels if config.conditioned else None
    _, error = _forward(synthesizer, [out, conditioned])
    if error is None:
        return
    if out.dtype != torch.float32 and _forward(synthesizer, [out.float(), conditioned])[1] is None:
        raise topology.error(("nodes", name, "module"), (
            f"{who} sends {_show(out)}, which its synthesizer (float32) cannot take: "
            f"{_why(error)}; a stage with synthetic gradients sends float32")) from error
    raise topology.error(key, f"{name}: its synthesizer on its output {_show(out)}: "
                         f"{_why(error)}") from error


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


def wiring(topology: Topology, name: str, found: Plan) -> Wiring:
    spec = topology.nodes[name]
    inputs = tuple(InEdge(e.name, e.src, node_window(topology, e.src),
                          topology.nodes[e.src].role != "source", found.shapes[e.src],
                          found.dtypes[e.src], Gather(e.gather), EdgeKind(e.kind))
                   for e in topology.in_edges(name))
    outputs = tuple(OutEdge(e.name, e.dst) for e in topology.outputs(name))
    return Wiring(name, inputs, outputs, node_window(topology, name), spec.role != "source",
                  topology.data.batch_size, found.num_classes, found.label_shape, spec.tick)


def build_stage(topology: Topology, name: str, found: Plan | None = None) -> Stage:
    """The Stage of a stage or head node, seeded from (topology seed, node name). Only its own
    module is built: the plan (resolved here when not given) gives every shape."""
    spec = topology.nodes[name]
    found = found or probe(topology)
    return make_stage(
        name, module_factory(topology, name),
        input_shapes=[input_shape(topology, e, found.shapes) for e in topology.inputs(name)],
        optimizer=spec.optimizer, rule=node_rule(topology, name),
        synthetic_gradient=SyntheticGradientConfig(**spec.synthetic_gradient),
        num_classes=found.num_classes, seed=topology.seed, window=node_window(topology, name),
        device=spec.device, output_shape=found.shapes[name], time=spec.time,
        input_dtypes=[found.dtypes[e.src] for e in topology.inputs(name)],
        label_shape=found.label_shape,
        objective=(node_objective(topology, name, found.label_shape, found.num_classes)
                   if spec.role == "head" else None),
        synthetic_input=spec.synthetic_input, source_shape=found.shapes[topology.source])


def largest_tensor(topology: Topology, name: str, found: Plan) -> int:
    """The most bytes one tensor sent to this node can legitimately hold: a batch of the
    activations of its in-edges, of the gradients of its own output, or of labels. A receiver
    bounds what a peer can make it allocate by this, not by the protocol's 1 GiB."""
    batch = topology.data.batch_size
    sizes = [8 * batch * math.prod(found.label_shape)]  # int64 labels
    for node in [e.src for e in topology.in_edges(name)] + ([name] if topology.outputs(name) else []):
        shape, dtype = found.shapes[node], found.dtypes[node]
        sizes.append(batch * math.prod(shape) * dtype.itemsize)
    return max(sizes)


def build_core(topology: Topology, name: str, clock: Clock, found: Plan | None = None,
               resume: dict | None = None) -> SourceCore | StageCore:
    """The node core of one node of the topology, with its stage or its data; resumed from a
    checkpoint's state (`Core.checkpoint_state`) when given."""
    found = found or probe(topology)
    wired = wiring(topology, name, found)
    policy = CheckpointPolicy(**topology.checkpoint)
    if topology.nodes[name].role == "source":
        data = source_batches(topology)
        if resume is not None:  # past what the source had taken when it saved
            data = itertools.islice(data, int(resume["core"]["taken"]), None)
        core = SourceCore(wired, data, clock, policy)
    else:
        core = StageCore(wired, build_stage(topology, name, found), clock, policy)
    if resume is not None:
        core.restore(resume)
    return core
