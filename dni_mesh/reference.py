"""Single-process reference trainer for a chain of stages: the oracle for the mesh.

It replays, in one process, the exact event order of the distributed mesh with ONE batch in
flight. For batch t: every stage's forward in chain order (a DNI stage updates at once), the
head's loss and update; then, from the head back, each stage's backward(t, grad) with the
gradient its downstream peer sent (from that peer's forward in DNI modes, from its backward in
locked modes). Stages are built by `build_stage`, which the mesh uses too: weights depend only
on (seed, node name), so both build identical networks and their losses can be compared.
"""
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from dni_mesh.stage import SYNTHETIC_MODES, Stage, StageConfig, StepResult
from dni_mesh.synthetic import SyntheticGradientConfig, Synthesizer, make_optimizer


def node_seed(seed: int, name: str) -> int:
    """A stable per-node seed (crc32, unlike Python's salted hash())."""
    return zlib.crc32(f"{seed}/{name}".encode())


def output_shape(module: nn.Module, input_shapes: Sequence[tuple[int, ...]],
                 device: torch.device | str = "cpu") -> tuple[int, ...]:
    """One sample's output shape, from a dry run in eval mode (no statistics change)."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = module(*[torch.zeros(2, *shape, device=device) for shape in input_shapes])
    module.train(was_training)
    return tuple(out.shape[1:])


def build_stage(name: str, make_module: Callable[[], nn.Module], *,
                input_shapes: Sequence[tuple[int, ...]], optimizer: dict,
                config: StageConfig, synthetic_gradient: SyntheticGradientConfig | None = None,
                head: bool = False, num_classes: int | None = None, seed: int = 0,
                device: torch.device | str = "cpu") -> Stage:
    """Construct a node's module, optimizer and synthesizer, seeded from (seed, name).

    The module is built under node_seed(seed, name) and the synthesizer under
    node_seed(seed, name + "/synthesizer"), both on the CPU and inside a forked RNG, so the
    caller's random state is untouched and changing one never shifts the other's weights.
    input_shapes are per-sample (float) input shapes, used to size the synthesizer. Mode
    "cdni" makes the synthesizer conditioned and "dni" unconditioned; "bp_lambda" keeps
    synthetic_gradient.conditioned.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(node_seed(seed, name))
        module = make_module()
    synthesizer = sg_optimizer = None
    if not head and config.mode in SYNTHETIC_MODES:
        sg_config = synthetic_gradient or SyntheticGradientConfig()
        if config.mode != "bp_lambda":
            sg_config = replace(sg_config, conditioned=config.mode == "cdni")
        shape = output_shape(module, input_shapes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(node_seed(seed, name + "/synthesizer"))
            synthesizer = Synthesizer(shape, num_classes, sg_config)
        sg_optimizer = make_optimizer(synthesizer.parameters(), sg_config.optimizer)
    module.to(device)
    if synthesizer is not None:
        synthesizer.to(device)
    return Stage(name, module, make_optimizer(module.parameters(), optimizer), synthesizer,
                 sg_optimizer, config, head=head, num_classes=num_classes, device=device)


@dataclass
class NodeSpec:
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
    nodes: list[NodeSpec]
    input_shape: tuple[int, ...]      # one sample of the source data
    num_classes: int
    mode: str = "dni"                 # "backprop" | "dni" | "cdni" | "bp_lambda"
    optimizer: dict = field(default_factory=lambda: {"name": "adam", "lr": 3e-4})
    synthetic_gradient: SyntheticGradientConfig = field(default_factory=SyntheticGradientConfig)
    bp_lambda: float = 1.0
    max_pending: int = 64
    seed: int = 0
    device: str = "cpu"


@dataclass
class Evaluation:
    loss: float        # mean cross-entropy per sample
    accuracy: float
    samples: int


class ChainTrainer:
    """Trains a chain of stages in the mesh's event order; records every step's loss."""

    def __init__(self, config: ChainConfig):
        self.config = config
        self.stages: list[Stage] = []
        shape = tuple(config.input_shape)
        for i, node in enumerate(config.nodes):
            stage = self.build(node, shape, head=i == len(config.nodes) - 1)
            self.stages.append(stage)
            if not stage.head:
                shape = output_shape(stage.module, [shape], stage.device)
        self.losses: list[float] = []
        self.seq = 0

    def build(self, node: NodeSpec, input_shape: tuple[int, ...], head: bool) -> Stage:
        c = self.config
        lam = c.bp_lambda if node.bp_lambda is None else node.bp_lambda
        return build_stage(
            node.name, node.make, input_shapes=[input_shape],
            optimizer=node.optimizer or c.optimizer,
            config=StageConfig(mode=node.mode or c.mode, bp_lambda=lam, max_pending=c.max_pending),
            synthetic_gradient=node.synthetic_gradient or c.synthetic_gradient, head=head,
            num_classes=c.num_classes, seed=c.seed, device=c.device)

    def step(self, x: Tensor, y: Tensor) -> StepResult:
        """Train on one batch; returns the head's result (loss, correct)."""
        seq, self.seq = self.seq, self.seq + 1
        sent_up: list[Tensor | None] = []     # gradient each stage sends to its upstream peer
        h = x
        for i, stage in enumerate(self.stages):
            result = stage.forward(seq, [h], y, needs_input_grad=[i > 0])
            sent_up.append(result.input_grads[0] if result.input_grads else None)
            h = result.output
        for i in reversed(range(len(self.stages) - 1)):
            back = self.stages[i].backward(seq, sent_up[i + 1])
            if back.input_grads:
                sent_up[i] = back.input_grads[0]
        self.losses.append(result.loss)
        return result

    def train_epoch(self, source, epoch: int) -> list[float]:
        """One pass over source.iterate(epoch); returns this epoch's losses."""
        return [self.step(x, y).loss for x, y in source.iterate(epoch)]

    def evaluate(self, source: Iterable[tuple[Tensor, Tensor]]) -> Evaluation:
        return evaluate(self.stages, source)


def evaluate(stages: Sequence[Stage], source: Iterable[tuple[Tensor, Tensor]]) -> Evaluation:
    """Mean loss and accuracy of a chain of stages (last = head) over a data source."""
    total_loss = correct = samples = 0
    for x, y in source:
        h = x
        for stage in stages:
            result = stage.forward(-1, [h], y, train=False)
            h = result.output
        total_loss += result.loss * len(y)
        correct += result.correct
        samples += len(y)
    return Evaluation(total_loss / max(samples, 1), correct / max(samples, 1), samples)
