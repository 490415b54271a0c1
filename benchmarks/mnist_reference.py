"""MNIST FCN with backprop, DNI and cDNI: the paper's first experiment, on the project's API.

    python -m benchmarks.mnist_reference [--depth 3,4] [--modes backprop,dni,cdni]
        [--epochs N] [--json PATH] [--data-dir DIR]

Jaderberg et al. 2016 (arXiv 1608.05343), table 1: hidden layers of FC-256 + batch norm + ReLU,
then a linear classifier; Adam, batch 256. Every hidden layer is its own stage of
dni_mesh.reference.ChainTrainer, so in the DNI modes each one updates from its own synthetic
gradient. What the synthesizers regress onto is the synthesizer `target`: cDNI bootstraps (each
stage's target is the gradient its downstream stage's synthesizer implies, the paper's way),
DNI uses `backprop` targets (the true gradient, one round trip late). This is the learning the
mesh does, in one process, so its accuracy is what a mesh run should reach.

Why these defaults (README "Learning: the paper's MNIST FCN in one process" lists everything
tried, failures too):
- synthesizer learning rates are far below the modules': a synthesizer regresses onto
  gradients of a mean loss, ~1e-5 per element, so its weights are tiny and an Adam step of
  1e-3 swamps them. After 3 epochs, cDNI's linear synthesizer gave 93.5% at 1e-3 and 97.7% at
  4e-6; DNI's gave 91.4% at 1e-3, 93.0% at 1e-4 and 91.1% at 1e-5;
- DNI (no labels) gets one hidden layer of 1024 in every synthesizer: a linear one passes on
  only what is linear in h (10 epochs: 94.2% linear, 95.4% with the hidden layer);
- DNI's head learns at 1e-2 (10 epochs: 95.9% against 95.4% at 1e-3);
- DNI's bootstrapped targets cap it near 96.5% however long it trains: with backprop targets
  it passes 97% within 10 epochs;
- every stage's learning rate decays to zero on a cosine over the run (the synthesizers' stay
  constant).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from dni_mesh.reference import ChainConfig, ChainNode, ChainTrainer
from dni_mesh.synthetic import SyntheticGradientConfig
from nodes.data import MNIST
from nodes.mlp import Block, Classifier

WIDTH = 256
# Per-mode defaults (chosen by the sweep in readme_parts/mnist_benchmark.md); flags override.
DEFAULTS = {
    "backprop": {"lr": 1e-3, "head_lr": 1e-3, "sg_lr": None, "sg_hidden": 0, "sg_target": None,
                 "epochs": 20},
    "dni": {"lr": 1e-3, "head_lr": 1e-2, "sg_lr": 1e-4, "sg_hidden": 1, "sg_target": "backprop",
            "epochs": 20},
    "cdni": {"lr": 1e-3, "head_lr": 1e-3, "sg_lr": 4e-6, "sg_hidden": 0, "sg_target": "bootstrap",
             "epochs": 30},
}


@dataclass
class Run:
    """One (mode, depth) training run and its measurements."""
    mode: str
    depth: int
    settings: dict
    test_accuracy: list[float] = field(default_factory=list)   # after each epoch
    train_loss: list[float] = field(default_factory=list)      # mean over each epoch
    samples_per_s: float = 0.0                                 # training only, no evaluation
    wall_s: float = 0.0                                        # training + evaluation


def chain(mode: str, depth: int, settings: dict) -> ChainTrainer:
    nodes = [ChainNode(f"fc{i + 1}", partial(Block, 784 if i == 0 else WIDTH, WIDTH))
             for i in range(depth)]
    nodes.append(ChainNode("head", partial(Classifier, WIDTH, 10),
                           optimizer={"name": "adam", "lr": settings["head_lr"]}))
    synthesizer = SyntheticGradientConfig(hidden=settings["sg_hidden"], width=settings["sg_width"],
                                          optimizer={"name": "adam", "lr": settings["sg_lr"]},
                                          target=settings["sg_target"] or "bootstrap")
    return ChainTrainer(ChainConfig(nodes=nodes, input_shape=(784,), num_classes=10, mode=mode,
                                    optimizer={"name": "adam", "lr": settings["lr"]},
                                    synthetic_gradient=synthesizer, seed=settings["seed"]))


def cosine(total_steps: int):
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def train(mode: str, depth: int, settings: dict, args: argparse.Namespace) -> Run:
    train_set = MNIST("train", settings["batch_size"], seed=settings["seed"], data_dir=args.data_dir)
    test_set = MNIST("test", 1000, shuffle=False, data_dir=args.data_dir)
    trainer = chain(mode, depth, settings)
    total = settings["epochs"] * len(train_set)
    factor = cosine(total) if settings["schedule"] == "cosine" else (lambda _: 1.0)
    schedules = [LambdaLR(stage.optimizer, factor) for stage in trainer.stages]
    run = Run(mode, depth, settings)
    train_s = samples = 0.0
    start = time.perf_counter()
    for epoch in range(settings["epochs"]):
        tick = time.perf_counter()
        losses = []
        for x, y in train_set.iterate(epoch):
            losses.append(trainer.step(x, y))
            for schedule in schedules:
                schedule.step()
            samples += len(y)
        train_s += time.perf_counter() - tick
        run.train_loss.append(sum(losses) / len(losses))
        run.test_accuracy.append(trainer.evaluate(test_set).accuracy)
        print(f"  {mode:8} depth {depth} epoch {epoch + 1:3}: loss {run.train_loss[-1]:.4f} "
              f"test {100 * run.test_accuracy[-1]:.2f}%", flush=True)
    run.samples_per_s = samples / train_s
    run.wall_s = time.perf_counter() - start
    return run


def table(runs: list[Run]) -> str:
    lines = [f"{'mode':8} {'depth':>5} {'epochs':>6} {'final %':>8} {'best %':>7} "
             f"{'samples/s':>10} {'wall s':>7}"]
    for r in runs:
        lines.append(f"{r.mode:8} {r.depth:5} {len(r.test_accuracy):6} "
                     f"{100 * r.test_accuracy[-1]:8.2f} {100 * max(r.test_accuracy):7.2f} "
                     f"{r.samples_per_s:10.0f} {r.wall_s:7.0f}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", default="3,4", help="hidden layers, comma separated")
    p.add_argument("--modes", default="backprop,dni,cdni")
    p.add_argument("--epochs", type=int, help="epochs per run (default: per mode)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, help="hidden stages' Adam learning rate (default: per mode)")
    p.add_argument("--head-lr", type=float, help="head's Adam learning rate (default: per mode)")
    p.add_argument("--sg-lr", type=float, help="synthesizers' Adam learning rate (default: per mode)")
    p.add_argument("--sg-hidden", type=int, help="hidden layers of the synthesizers (default: per mode)")
    p.add_argument("--sg-target", choices=["bootstrap", "backprop"],
                   help="what synthesizers regress onto (default: per mode)")
    p.add_argument("--sg-width", type=int, default=1024, help="units per synthesizer hidden layer")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="modules' learning rate over the whole run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="folder holding mnist/ (default: env DNI_MESH_DATA)")
    p.add_argument("--json", help="write the runs here")
    return p.parse_args()


def settings_for(mode: str, args: argparse.Namespace) -> dict:
    """The mode's defaults, overridden by the flags that were given."""
    settings = dict(DEFAULTS[mode])
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return settings | {"sg_width": args.sg_width, "schedule": args.schedule,
                       "batch_size": args.batch_size, "seed": args.seed}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    runs = [train(mode, int(depth), settings_for(mode, args), args)
            for depth in args.depth.split(",") for mode in args.modes.split(",")]
    print(table(runs))
    if args.json:
        machine = {"platform": platform.platform(), "processor": platform.processor(),
                   "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads}
        with open(args.json, "w") as f:
            json.dump({"command": ["python", "-m", "benchmarks.mnist_reference", *sys.argv[1:]],
                       "machine": machine,
                       "runs": [asdict(r) for r in runs]}, f, indent=1)


if __name__ == "__main__":
    main()
