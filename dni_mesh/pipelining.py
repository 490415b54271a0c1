"""The peer a user would pick instead of the mesh: PyTorch's own pipeline, GPipe on gloo.

`torch.distributed.pipelining` with `ScheduleGPipe` trains the same chain of stages as the mesh,
one process per stage over gloo on tcp loopback, with the same modules, seeds, optimizers and
batches (every stage is built by `dni_mesh.build.build_stage`). It is synchronous backprop: each
batch is cut into microbatches, all of them flow forward, then all backward, then every stage
steps its optimizer. The mesh's benchmark runs it beside the mesh as the honest baseline.

What differs from the mesh, and why:
- The first stage reads the data and sends each batch's labels to the last stage, which owns
  the loss. Microbatch shapes are fixed up front, so a final partial training batch is skipped.
- Batch norm sees microbatches, not whole batches.
- Evaluation goes through the same pipeline (`ScheduleGPipe.eval`); the last test batch is
  padded to the fixed shape, and the padding is not counted.
- The mesh's link emulation lives in its own transport: it cannot delay gloo's sockets, and
  the kernel has no `tc netem`, so this peer only runs without added delay.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

from dni_mesh.build import build_source, build_stage, probe
from dni_mesh.reference import chain_names
from dni_mesh.topology import Topology, load_topology
from dni_mesh.transport import free_tcp_port

LABEL_TAG = 77  # labels travel first -> last stage; a tag of their own keeps them apart
PADDING = -100  # cross_entropy's ignore_index: the label of a padded test sample
TIMEOUT = timedelta(seconds=120)  # a stuck collective fails the run instead of hanging it


@dataclass
class GPipeResult:
    """What the last stage measured; times are seconds since `run_gpipe` was called."""
    test_accuracy: float
    evals: list[tuple[float, float]]  # (time, test accuracy) after each evaluation pass
    step_ends: list[float]  # when each training step ended on the last stage
    batch_size: int
    stages: int
    microbatches: int
    wall_s: float = 0.0
    losses: list[float] = field(default_factory=list)


def run_gpipe(topology_path: str | Path, overrides: Sequence[str], out_dir: Path,
              microbatches: int = 4) -> GPipeResult:
    """Train the topology's chain with GPipe, one spawned process per stage; evaluate as the
    topology's `eval_every` says. Raises when a stage process fails."""
    topology = load_topology(topology_path, overrides)
    if topology.data.batch_size % microbatches:
        raise ValueError(f"batch_size {topology.data.batch_size} does not split into "
                         f"{microbatches} equal microbatches")
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = len(chain_names(topology))
    started = time.monotonic()  # CLOCK_MONOTONIC is system-wide: the stages measure from it too
    mp.spawn(_stage_process, nprocs=stages, join=True,
             args=(str(topology.path), list(overrides), free_tcp_port(), microbatches, started,
                   str(out_dir)))
    result = GPipeResult(**json.loads((out_dir / "gpipe.json").read_text()))
    result.wall_s = time.monotonic() - started
    return result


def _stage_process(rank: int, path: str, overrides: list[str], port: int, microbatches: int,
                   started: float, out_dir: str) -> None:
    topology = load_topology(path, [*overrides, "mode=backprop"])
    names = chain_names(topology)
    torch.set_num_threads(topology.nodes[names[rank]].threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=len(names), timeout=TIMEOUT)
    try:
        result = _GPipeStage(topology, names, rank, microbatches, started).train()
        if result is not None:
            (Path(out_dir) / "gpipe.json").write_text(json.dumps(asdict(result)) + "\n")
    finally:
        dist.destroy_process_group()


class _GPipeStage:
    """One rank's part of the pipeline: its module, optimizer and schedule."""

    def __init__(self, topology: Topology, names: list[str], rank: int, microbatches: int,
                 started: float):
        self.topology = topology
        self.rank = rank
        self.stages = len(names)
        self.first, self.last = rank == 0, rank == self.stages - 1
        self.stage = build_stage(topology, names[rank])
        self.module = self.stage.module
        self.batch_size = topology.data.batch_size
        found = probe(topology)
        out, num_classes = found.shapes, found.num_classes
        size = self.batch_size // microbatches
        # Shapes given up front: inferring them runs the module on an uninitialised buffer,
        # which puts NaN into the running statistics of batch norm.
        pipe = PipelineStage(
            self.module, rank, self.stages, torch.device("cpu"),
            input_args=torch.zeros(size, *out[[topology.source, *names][rank]],
                                   requires_grad=not self.first),
            output_args=torch.zeros(size, *(out[names[rank]] if not self.last else (num_classes,)),
                                    requires_grad=True))
        # Every rank needs the loss function: without one a schedule runs forward only.
        self.schedule = ScheduleGPipe(pipe, microbatches, loss_fn=F.cross_entropy)
        self.microbatches = microbatches
        self.started = started

    def train(self) -> GPipeResult | None:
        """The training loop every rank runs in step; the last rank returns the result."""
        data = self.topology.data
        train = build_source(self.topology, "train") if self.first else None
        test = build_source(self.topology, "test") if self.first else None
        steps, test_batches = self.plan(train, test)
        evals: list[tuple[float, float]] = []
        step_ends: list[float] = []
        losses: list[float] = []
        for epoch in range(data.epochs):
            batches = iter(train.iterate(epoch)) if self.first else None
            for _ in range(steps):
                losses.append(self.train_step(next(batches) if self.first else None))
                step_ends.append(self.clock())
            if epoch + 1 == data.epochs or (data.eval_every and (epoch + 1) % data.eval_every == 0):
                accuracy = self.evaluate(iter(test) if self.first else None, test_batches)
                evals.append((self.clock(), accuracy))
        if not self.last:
            return None
        return GPipeResult(test_accuracy=evals[-1][1], evals=evals, step_ends=step_ends,
                           batch_size=self.batch_size, stages=self.stages,
                           microbatches=self.microbatches, losses=losses)

    def clock(self) -> float:
        return round(time.monotonic() - self.started, 4)

    def plan(self, train, test) -> tuple[int, int]:
        """Training steps per epoch (full batches only) and test batches, sent by the first rank."""
        plan = torch.zeros(2, dtype=torch.int64)
        if self.first:
            full = len(train.y) // self.batch_size
            limit = self.topology.data.limit
            plan[:] = torch.tensor([min(full, limit or full), len(test)])
        dist.broadcast(plan, src=0)
        return int(plan[0]), int(plan[1])

    def labels(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """Ship a batch's labels from the first rank to the last (which needs them for the loss)."""
        last = self.stages - 1
        if self.first and self.last:
            return y
        if self.first:
            dist.send(y, dst=last, tag=LABEL_TAG)
        elif self.last:
            y = torch.empty(self.batch_size, dtype=torch.int64)
            dist.recv(y, src=0, tag=LABEL_TAG)
        return y

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor] | None) -> float | None:
        x, y = batch if batch is not None else (None, None)
        y = self.labels(y)
        self.module.train()
        self.stage.optimizer.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        self.schedule.step(*self.inputs(x), **(dict(target=y, losses=losses) if self.last else {}))
        self.stage.optimizer.step()
        return float(torch.stack(losses).detach().mean()) if losses else None

    def inputs(self, x: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        return (x,) if self.first else ()

    def evaluate(self, batches, count: int) -> float:
        """Test accuracy through the pipeline, forward only; the last test batch is padded."""
        self.module.eval()
        correct = total = 0
        with torch.no_grad():
            for _ in range(count):
                x = y = None
                if self.first:
                    x, y = next(batches)
                    pad = self.batch_size - len(y)
                    x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
                    y = torch.cat([y, y.new_full((pad,), PADDING)])
                y = self.labels(y)
                out = self.schedule.eval(*self.inputs(x), **(dict(target=y) if self.last else {}))
                if self.last:
                    correct += int((out.argmax(dim=1) == y).sum())
                    total += int((y != PADDING).sum())
        return correct / max(total, 1)
