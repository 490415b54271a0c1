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
window, as in the mesh. Each variant changes settings (topology overrides) or a stage's code
(a subclass put in place of `Stage`: prototypes of changes to dni_mesh/stage.py). `--list`
prints the variants.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dni_mesh.build import build_source
from dni_mesh.reference import ChainConfig, ChainTrainer
from dni_mesh.stage import BackwardResult, Stage, StepResult
from dni_mesh.topology import load_topology

TOPOLOGY = Path(__file__).resolve().parent.parent / "examples" / "bench_mnist.yaml"


# ---- prototypes of stage changes -------------------------------------------------------------

class RefitStage(Stage):
    """Fit the synthesizer on h recomputed with the current weights (not the h of seq t)."""

    def forward(self, seq, inputs, labels, needs_input_grad=None):
        result = super().forward(seq, inputs, labels, needs_input_grad)
        if seq in self.pending and not self.pending[seq].inputs:
            self.pending[seq].inputs = [x.detach() for x in inputs]
        return result

    def backward(self, seq, grad):
        entry = self.pending.get(seq)
        if entry is not None and entry.inputs and self.rule is not None and self.rule.synthetic:
            state = {**dict(self.module.named_parameters()),
                     **{n: b.clone() for n, b in self.module.named_buffers()}}
            with torch.no_grad():
                entry.h = torch.func.functional_call(self.module, state, tuple(entry.inputs))
            if not self.rule.defers_input_grads:
                entry.inputs = []
        return super().backward(seq, grad)


class GatedStage(Stage):
    """Trust the synthesizer only as far as it predicts: each update's learning rate is the
    module's times q = 1 - EMA(fit loss) / EMA(mean square of the target), clipped to [0, 1]
    (the fraction of the target's power M explains, on the targets it is fitted on)."""

    decay = 0.9
    err = power = None

    def fit_synthesizer(self, h, labels, grad):
        loss = super().fit_synthesizer(h, labels, grad)
        power = grad.double().pow(2).mean().item()
        self.err = loss if self.err is None else self.decay * self.err + (1 - self.decay) * loss
        self.power = power if self.power is None else (self.decay * self.power
                                                       + (1 - self.decay) * power)
        return loss

    def quality(self) -> float:
        if not self.power:
            return 0.0
        return min(1.0, max(0.0, 1.0 - self.err / self.power))

    def apply(self, h, grad):
        saved = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] *= self.quality()
        try:
            super().apply(h, grad)
        finally:
            for group, lr in zip(self.optimizer.param_groups, saved):
                group["lr"] = lr


class AppliedGatedStage(GatedStage):
    """GatedStage whose q is measured on the synthetic gradients the stage applied (made at
    forward time, W updates of M before their targets came back), not on M's fit now: it
    sees the staleness too."""

    def forward(self, seq, inputs, labels, needs_input_grad=None):
        result = super().forward(seq, inputs, labels, needs_input_grad)
        if seq in self.pending:
            self.pending[seq].applied = self.last_applied
        return result

    def synthetic_gradient(self, h, labels):
        self.last_applied = super().synthetic_gradient(h, labels)
        return self.last_applied

    def fit_synthesizer(self, h, labels, grad):
        loss = Stage.fit_synthesizer(self, h, labels, grad)
        entry_err = (self.applying - grad).double().pow(2).mean().item()
        power = grad.double().pow(2).mean().item()
        d = self.decay
        self.err = entry_err if self.err is None else d * self.err + (1 - d) * entry_err
        self.power = power if self.power is None else d * self.power + (1 - d) * power
        return loss

    def backward(self, seq, grad):
        entry = self.pending.get(seq)
        self.applying = getattr(entry, "applied", None)
        return super().backward(seq, grad)


class EagerGatedStage(GatedStage):
    """GatedStage with a shorter memory (EMA decay 0.5) and q ** 0.5: opens sooner."""

    decay = 0.5

    def quality(self) -> float:
        return super().quality() ** 0.5


class PredictedStage(Stage):
    """Delayed with weight prediction (SpecTrain-like): run the forward with, and stash, the
    weights the optimizer heads for by the time the gradient comes back, w - (W - 1) * Adam's
    current step; the gradient taken there is applied to the current weights."""

    horizon = 0  # steps to predict ahead; set per run

    def delay(self, seq, leaves, labels, needs_input_grad):
        saved = [p.detach().clone() for p in self.module.parameters()]
        with torch.no_grad():
            for p in self.module.parameters():
                p.sub_(self.horizon * adam_step(self.optimizer, p))
        try:
            return super().delay(seq, leaves, labels, needs_input_grad)
        finally:
            with torch.no_grad():
                for p, w in zip(self.module.parameters(), saved):
                    p.copy_(w)


def adam_step(optimizer, p) -> torch.Tensor:
    """The step Adam would take on p now, from its moments (zero before the first step)."""
    state = optimizer.state.get(p)
    if not state:
        return torch.zeros_like(p)
    group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    (b1, b2), t = group["betas"], float(state["step"])
    m = state["exp_avg"] / (1 - b1 ** t)
    v = state["exp_avg_sq"] / (1 - b2 ** t)
    return group["lr"] * m / (v.sqrt() + group["eps"])


class CurrentStage(Stage):
    """Delayed without weight stashing: the gradient is taken at the current weights."""

    def apply_stashed(self, entry, grad):
        entry.stash.update({n: p.detach().clone() for n, p in self.module.named_parameters()})
        return super().apply_stashed(entry, grad)


class AveragedStage(Stage):
    """Delayed, stepping once per `every` gradients with their mean."""

    every = 1

    def apply_stashed(self, entry, grad):
        self.optimizer.step = lambda: None  # shadows the bound method for this call
        try:
            grads = super().apply_stashed(entry, grad)
        finally:
            del self.optimizer.step
        params = list(self.module.parameters())
        self.summed = [p.grad + s for p, s in zip(params, getattr(self, "summed", None)
                                                   or [0] * len(params))]
        if self.stats.steps % self.every == 0:
            for p, s in zip(params, self.summed):
                p.grad = s / self.every
            self.optimizer.step()
            self.summed = None
        return grads


# ---- variants --------------------------------------------------------------------------------

@dataclass
class Variant:
    about: str
    overrides: list[str] = field(default_factory=list)  # topology --set
    stage_class: type[Stage] | None = None             # for every non-head stage
    stage_opt: dict = field(default_factory=dict)       # non-head optimizer settings; a str
    head_opt: dict = field(default_factory=dict)        # value is a formula in W


VARIANTS = {
    "base": Variant("bench_mnist.yaml as it is"),
    "sg_lr_3e-6": Variant("synthesizer Adam 3e-6",
                          ["defaults.synthetic_gradient.optimizer.lr=3e-6"]),
    "sg_lr_3e-5": Variant("synthesizer Adam 3e-5",
                          ["defaults.synthetic_gradient.optimizer.lr=3e-5"]),
    "sg_scale_0.1": Variant("synthetic gradient scaled by 0.1",
                            ["defaults.synthetic_gradient.scale=0.1"]),
    "target_backprop": Variant("synthesizer target: backprop",
                               ["defaults.synthetic_gradient.target=backprop"]),
    "gate": Variant("module lr x the synthesizer's explained fraction q", stage_class=GatedStage),
    "gate_applied": Variant("gate, q measured on the synthetic gradients applied",
                            stage_class=AppliedGatedStage),
    "gate_eager": Variant("gate with EMA decay 0.5 and sqrt(q)", stage_class=EagerGatedStage),
    "refit_h": Variant("fit M on h recomputed with the current weights", stage_class=RefitStage),
    "lr_over_sqrtW": Variant("stage lr 1e-3 / sqrt(W)", stage_opt={"lr": "1e-3 / sqrt(W)"}),
    "lr_3e-4": Variant("stage lr 3e-4", stage_opt={"lr": 3e-4}),
    "lr_1e-4": Variant("stage lr 1e-4", stage_opt={"lr": 1e-4}),
    "beta1_0.5": Variant("stage Adam betas (0.5, 0.999)", stage_opt={"betas": (0.5, 0.999)}),
    "beta1_0": Variant("stage Adam betas (0, 0.999)", stage_opt={"betas": (0.0, 0.999)}),
    "eps_1e-5": Variant("stage Adam eps 1e-5", stage_opt={"eps": 1e-5}),
    "head_lr_over_W": Variant("head lr 1e-3 / W", head_opt={"lr": "1e-3 / W"}),
    "predict": Variant("delayed: forward with weights predicted W - 1 steps on",
                       stage_class=PredictedStage),
    "no_stash": Variant("delayed: gradient at the current weights", stage_class=CurrentStage),
    "average": Variant("delayed: one step per W gradients, their mean", stage_class=AveragedStage),
}


def variant(name: str) -> Variant:
    """A variant by name; "a+b" combines a and b (b's stage class wins)."""
    parts = [VARIANTS[n] for n in name.split("+")]
    return Variant(" + ".join(p.about for p in parts),
                   [o for p in parts for o in p.overrides],
                   next((p.stage_class for p in reversed(parts) if p.stage_class), None),
                   {k: v for p in parts for k, v in p.stage_opt.items()},
                   {k: v for p in parts for k, v in p.head_opt.items()})


# ---- the simulation --------------------------------------------------------------------------

def formula(text: str, window: int) -> float:
    return float(eval(text, {"W": window, "sqrt": math.sqrt}))


def build(mode: str, window: int, variant: Variant, seed: int) -> tuple[list[Stage], object]:
    overrides = [f"mode={mode}", f"seed={seed}", *variant.overrides]
    topology = load_topology(TOPOLOGY, overrides)
    stages = ChainTrainer(ChainConfig.from_topology(topology)).stages
    for stage in stages:
        stage.window = window
        if variant.stage_class is not None and not stage.head:
            stage.__class__ = variant.stage_class
            stage.horizon, stage.every = window - 1, window
        for group in stage.optimizer.param_groups:
            for key, value in (variant.head_opt if stage.head else variant.stage_opt).items():
                group[key] = formula(value, window) if isinstance(value, str) else value
    return stages, topology


def simulate(mode: str, window: int, variant: Variant, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    started = time.monotonic()
    stages, topology = build(mode, window, variant, seed)
    train, test = build_source(topology, "train"), build_source(topology, "test")
    mail: list[dict[int, torch.Tensor]] = [{} for _ in stages]  # stage i's output grads, by seq
    in_flight: deque[int] = deque()
    accuracy, losses, seq = [], [], 0
    for epoch in range(topology.data.epochs):
        for batch, (x, y) in enumerate(train.iterate(epoch)):
            if batch >= topology.data.limit:
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
            "train_loss_last_epoch": round(sum(losses[-60:]) / 60, 4),
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
        for name, v in VARIANTS.items():
            print(f"{name:18} {v.about}")
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
                           "about": chosen.about, **out}
                    print(json.dumps(row), flush=True)
                    rows = [r for r in rows if (r["mode"], r["window"], r["variant"], r["seed"])
                            != (mode, window, name, seed)] + [row]
                    if args.json:
                        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
