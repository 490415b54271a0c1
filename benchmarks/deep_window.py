"""A mesh's window in one process: what W outputs in flight do to DNI, cDNI and delayed (issue 15).

    DNI_MESH_DATA=../shared/data python -m benchmarks.deep_window \
        [--modes dni,cdni,delayed] [--windows 1,8,24] [--variants base,...] [--seeds 0] \
        [--json benchmarks/results/deep_window.json]

The network, data, seeds and settings are `examples/bench_mnist.yaml`'s (MNIST FCN: three
FC-256 + BN + ReLU stages and a linear head, batch 256, 4 epochs of 60 batches, test pass after
each). Its stages are built by the reference trainer (`dni_mesh.reference.ChainTrainer`, hence
`dni_mesh.build.make_stage`), and this file drives their `Stage.forward` / `Stage.backward`
itself, deterministically: every batch goes forward through the whole chain at once (the head
answers at once), and when W batches are in flight the oldest one's gradients are delivered,
head side first, so that each stage gets the gradient of seq t just before its forward of seq
t + W. That is a mesh at window W whose windows are full (a slow link, instant compute). At
W = 1 it is exactly the reference trainer's order of events. Evaluation does not drain the
window, as in the mesh. Each variant changes settings (topology overrides); `--list` prints them.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import deque
from pathlib import Path

import torch

from dni_mesh.build import build_source
from dni_mesh.reference import ChainConfig, ChainTrainer
from dni_mesh.stage import BackwardResult, Stage, StepResult
from dni_mesh.topology import load_topology

TOPOLOGY = Path(__file__).resolve().parent.parent / "examples" / "bench_mnist.yaml"


# ---- variants: settings changed from bench_mnist.yaml ---------------------------------------

SYNTH = "defaults.synthetic_gradient"
VARIANTS = {
    "base": [],
    "sg_lr_3e-6": [f"{SYNTH}.optimizer.lr=3e-6"],
    "sg_lr_3e-5": [f"{SYNTH}.optimizer.lr=3e-5"],
    "sg_scale_0.1": [f"{SYNTH}.scale=0.1"],
    "target_backprop": [f"{SYNTH}.target=backprop"],
    "gate": [f"{SYNTH}.gate=true"],
    "full_epochs": ["data.limit=null"],  # 4 passes over MNIST's 235 batches instead of 4 x 60
}
"""Each a list of topology overrides; "a+b" combines them. What else was tried (the stages'
learning rate, Adam's betas and eps with the head's kept; refitting M on the current h; a gate
measured on the gradients applied, or with a shorter memory; for delayed, weight prediction,
gradient averaging and no stashing) was prototyped in this file before the gate was built in:
see its history (commit c0cd215) and its rows in results/deep_window.json."""


def variant(name: str) -> list[str]:
    return [o for part in name.split("+") for o in VARIANTS[part]]


# ---- the simulation --------------------------------------------------------------------------

def build(mode: str, window: int, overrides: list[str], seed: int) -> tuple[list[Stage], object]:
    topology = load_topology(TOPOLOGY, [f"mode={mode}", f"seed={seed}", *overrides])
    stages = ChainTrainer(ChainConfig.from_topology(topology)).stages
    for stage in stages:
        stage.window = window
    return stages, topology


def simulate(mode: str, window: int, overrides: list[str], seed: int = 0) -> dict:
    torch.manual_seed(seed)
    started = time.monotonic()
    stages, topology = build(mode, window, overrides, seed)
    train, test = build_source(topology, "train"), build_source(topology, "test")
    mail: list[dict[int, torch.Tensor]] = [{} for _ in stages]  # stage i's output grads, by seq
    in_flight: deque[int] = deque()
    accuracy, losses, seq = [], [], 0
    for epoch in range(topology.data.epochs):
        for batch, (x, y) in enumerate(train.iterate(epoch)):
            if topology.data.limit is not None and batch >= topology.data.limit:
                break
            h = x
            for i, stage in enumerate(stages):
                result: StepResult = stage.forward(seq, [h], y, [i > 0])
                if i > 0 and result.input_grads is not None:
                    mail[i - 1][seq] = result.input_grads[0]
                h = result.output
            losses.append(result.loss)
            in_flight.append(seq)
            seq += 1
            if len(in_flight) == window:  # the oldest seq's gradients arrive, head side first
                old = in_flight.popleft()
                for i in reversed(range(len(stages) - 1)):
                    back: BackwardResult = stages[i].backward(old, mail[i].pop(old))
                    if i > 0 and back.input_grads is not None:
                        mail[i - 1][old] = back.input_grads[0]
        correct = total = 0
        for x, y in test:
            h = x
            for stage in stages:
                result = stage.evaluate([h], y)
                h = result.output
            correct, total = correct + result.correct, total + result.scored
        accuracy.append(round(100 * correct / total, 2))
    curve = [round(sum(losses[i:i + 20]) / 20, 3) for i in range(0, len(losses), 20)]
    return {"test_accuracy": accuracy, "final": accuracy[-1], "loss_per_20": curve,
            "train_loss_last_epoch": round(sum(losses[-60:]) / 60, 4),  # the last 60 batches
            "wall_s": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="dni,cdni,delayed")
    parser.add_argument("--windows", default="1,8,24")
    parser.add_argument("--variants", default="base")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        for name, overrides in VARIANTS.items():
            print(f"{name:18} {' '.join(overrides) or 'bench_mnist.yaml as it is'}")
        return
    torch.set_num_threads(1)  # one thread, like one node
    rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    for name in args.variants.split(","):
        for mode in args.modes.split(","):
            for window in map(int, args.windows.split(",")):
                for seed in map(int, args.seeds.split(",")):
                    if mode == "backprop" and window > 1:
                        continue  # locked: one step in flight by construction
                    chosen = variant(name)
                    out = simulate(mode, window, chosen, seed)
                    row = {"mode": mode, "window": window, "variant": name, "seed": seed,
                           "overrides": chosen, **out}
                    print(json.dumps(row), flush=True)
                    rows = [r for r in rows if (r["mode"], r["window"], r["variant"], r["seed"])
                            != (mode, window, name, seed)] + [row]
                    if args.json:
                        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
