"""One node's learning step: its module, optimizer and (for DNI) synthesizer, with no transport.

The node core calls `forward(seq, ...)` when the activations of step seq have arrived and
`backward(seq, grad)` when the gradient of that step's output comes back (summed over all
consumers); it ships what the calls return. What happens in between is the node's update rule
(`dni_mesh.update`):

- `SyntheticGradient`: update at once with g = M(h) (conditioned: M(h, labels)) and fit M when
  the true gradient for seq comes back. Upstream goes, per the rule's target, either the input
  gradient g implies, at once (bootstrap), or the true gradient backpropagated through the
  module when it arrives (backprop, recomputed with the current weights).
- `Backprop`: locked; keep the graph until the gradient comes back, then update and send the
  true input gradients upstream. Calls must alternate forward(t), backward(t): a later
  forward's graph would be invalidated by the earlier batch's in-place update.
- `BPLambda`: locked like backprop, but the gradient applied to h is lam * grad + (1 - lam) *
  M(h), where grad is itself the downstream node's mixture (lam = 1 is backprop, lam = 0 pure
  synthetic gradients). The mixture is backpropagated into the module and upstream; M is fitted
  on grad.
- `Delayed`: no update at forward time; the step keeps a copy of the weights it used (a
  stash) and, when its gradient comes back, recomputes its output with them, takes the weight
  and input gradients there and applies the weight gradients to the current weights.

Complete unlock (paper section 3.4): a synthetic-gradient stage may also have a synthetic input
I(x), a model of its input from the source's batch x. It then updates in `synthetic_step`, on
module(I(x)) with M's gradient, as soon as x is there; `forward` on the real input makes the
output for downstream and the input gradient for upstream without updating the module, and
`fit_input` regresses I(x) onto the real input.

A head stage owns an objective (the loss) instead of a rule: it updates from the true gradient
in `forward` and returns the true input gradients, the loss and the number of correct
predictions.

The pending table holds at most `window` steps: the node core never has more outputs in flight,
so a stage never has to evict (and so never to forget to answer) one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from dni_mesh.objective import Objective
from dni_mesh.synthetic import Explained, Synthesizer, SyntheticInput, fit
from dni_mesh.update import Backprop, BPLambda, Delayed, SyntheticGradient, UpdateRule


@dataclass
class StepResult:
    output: Tensor | None                   # activation for downstream (detached); None for a head
    input_grads: list[Tensor | None] | None  # per input, gradient to send upstream now
    loss: float | None = None               # head: the objective's loss
    correct: int | None = None              # head: correct predictions in the batch
    scored: int | None = None               # head: the predictions `correct` counts over


@dataclass
class BackwardResult:
    input_grads: list[Tensor | None] | None  # gradients to send upstream now, if any
    sg_loss: float | None = None            # synthesizer regression loss, when it was fitted


@dataclass
class StageStats:
    steps: int = 0      # module optimizer steps
    sg_fits: int = 0    # synthesizer regression steps
    input_fits: int = 0  # synthetic input regression steps (complete unlock)
    stale: int = 0      # backward for a seq already answered
    unknown: int = 0    # backward for a seq never taken forward in training


@dataclass
class Pending:
    """What a node keeps for a seq until its gradient comes back."""
    h: Tensor                                # output; attached to the graph in locked rules
    labels: Tensor | None
    inputs: list[Tensor] = field(default_factory=list)   # leaves: locked rules, target backprop
    needs_grad: list[bool] = field(default_factory=list)  # target backprop: inputs to answer
    stash: dict[str, Tensor] | None = None  # Delayed: the weights and buffers the step used


class Stage:
    """One node's module + optimizer (+ synthesizer). A head has an objective, a stage a rule."""

    def __init__(self, name: str, module: nn.Module, optimizer: Optimizer, *,
                 rule: UpdateRule | None = None, objective: Objective | None = None,
                 synthesizer: Synthesizer | None = None, sg_optimizer: Optimizer | None = None,
                 synthetic_input: SyntheticInput | None = None,
                 input_optimizer: Optimizer | None = None,
                 window: int = 1, device: torch.device | str = "cpu"):
        if (rule is None) == (objective is None):
            raise ValueError(f"stage {name}: give an update rule (a stage) or an objective "
                             "(a head), not both or neither")
        if window < 1:
            raise ValueError(f"stage {name}: window must be at least 1, got {window}")
        if rule is not None and rule.synthetic and (synthesizer is None or sg_optimizer is None):
            raise ValueError(f"stage {name}: rule {rule} needs a synthesizer and its optimizer")
        if isinstance(rule, SyntheticGradient) and synthesizer.conditioned != rule.conditioned:
            raise ValueError(f"stage {name}: rule {rule} needs a "
                             f"{'' if rule.conditioned else 'un'}conditioned synthesizer")
        if synthetic_input is not None and not (
                isinstance(rule, SyntheticGradient) and input_optimizer is not None):
            raise ValueError(f"stage {name}: a synthetic input needs the dni or cdni rule and "
                             f"an optimizer for I, not {rule}")
        self.name = name
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.optimizer = optimizer
        self.rule = rule
        self.objective = objective
        self.synthesizer = synthesizer.to(self.device) if synthesizer is not None else None
        self.sg_optimizer = sg_optimizer
        self.synthetic_input = synthetic_input.to(self.device) if synthetic_input is not None else None
        self.input_optimizer = input_optimizer
        self.window = window
        self.explained = Explained()  # of the synthesizer's targets, for its gate
        self.stats = StageStats()
        self.pending: dict[int, Pending] = {}
        self.last_seq = -1  # highest seq taken forward in training: tells stale from unknown

    @property
    def head(self) -> bool:
        return self.objective is not None

    def forward(self, seq: int, inputs: list[Tensor], labels: Tensor | None,
                needs_input_grad: list[bool] | None = None) -> StepResult:
        """Train on step seq: run the module on inputs (called as module(*inputs)).

        needs_input_grad: per input, whether to return its gradient; None asks for every
        floating-point input.
        """
        if len(self.pending) >= self.window:
            raise RuntimeError(f"stage {self.name}: forward of seq {seq} with {self.window} steps "
                               "already waiting for their gradient (the window is full)")
        labels = labels.to(self.device) if labels is not None else None
        if needs_input_grad is None:
            needs_input_grad = [x.is_floating_point() for x in inputs]
        deferred = (isinstance(self.rule, (SyntheticGradient, Delayed))
                    and self.rule.defers_input_grads and any(needs_input_grad))
        leaves = [x.to(self.device).detach().requires_grad_(need and not deferred)
                  for x, need in zip(inputs, needs_input_grad, strict=True)]
        self.module.train()
        self.last_seq = max(self.last_seq, seq)
        if self.objective is not None:
            return self.head_step(leaves, labels)
        if isinstance(self.rule, Delayed):
            return self.delay(seq, leaves, labels, needs_input_grad)
        h = self.module(*leaves)
        if self.rule.locked:
            self.pending[seq] = Pending(h, labels, leaves)
            return StepResult(output=h.detach(), input_grads=None)
        synthetic = self.synthetic_gradient(h.detach(), labels)
        if self.synthetic_input is None:  # else the module learns in synthetic_step only
            self.apply(h, synthetic, self.trust())
        if deferred:
            self.pending[seq] = Pending(h.detach(), labels, leaves, list(needs_input_grad))
            return StepResult(output=h.detach(), input_grads=None)
        self.pending[seq] = Pending(h.detach(), labels)
        unlocked = self.synthetic_input is not None
        return StepResult(output=h.detach(),
                          input_grads=leaf_grads(h, leaves, synthetic) if unlocked else grads_of(leaves))

    def backward(self, seq: int, grad: Tensor) -> BackwardResult:
        """Take the gradient for seq's output (summed over consumers).

        Synthetic gradients: fit the synthesizer on it. Locked rules: update now and return the
        input gradients. A stale or unknown seq is counted and ignored.
        """
        entry = self.pending.pop(seq, None)
        if entry is None:
            if seq <= self.last_seq:
                self.stats.stale += 1
            else:
                self.stats.unknown += 1
            return BackwardResult(input_grads=None)
        grad = grad.to(device=self.device, dtype=entry.h.dtype)  # the wire may carry less
        if isinstance(self.rule, Backprop):
            self.apply(entry.h, grad)
            return BackwardResult(input_grads=grads_of(entry.inputs))
        if isinstance(self.rule, Delayed):
            return BackwardResult(input_grads=self.apply_stashed(entry, grad))
        if isinstance(self.rule, BPLambda):
            lam = self.rule.lam
            synthetic = self.synthetic_gradient(entry.h.detach(), entry.labels)
            self.apply(entry.h, lam * grad + (1 - lam) * synthetic)
            return BackwardResult(input_grads=grads_of(entry.inputs),
                                  sg_loss=self.fit_synthesizer(entry.h.detach(), entry.labels, grad))
        sg_loss = self.fit_synthesizer(entry.h, entry.labels, grad)
        input_grads = self.backpropagate(entry.inputs, entry.needs_grad, grad) if entry.inputs else None
        return BackwardResult(input_grads=input_grads, sg_loss=sg_loss)

    def synthetic_step(self, x: Tensor, labels: Tensor | None) -> None:
        """Complete unlock: update on module(I(x)) with M's gradient, without the real input.
        Buffers are copied: batch-norm statistics count real inputs only, as evaluation uses."""
        x = x.to(self.device, torch.float32)
        self.synthetic_input.train()
        with torch.no_grad():
            guess = self.synthetic_input(x)
        h = self.fresh_forward([guess])
        self.apply(h, self.synthetic_gradient(h.detach(), labels), self.trust())

    def fit_input(self, x: Tensor, real: Tensor) -> float:
        """Regress I(x) onto the real input that came for the source's batch x."""
        loss = fit(self.synthetic_input, self.input_optimizer, real.to(self.device),
                   x.to(self.device, torch.float32))
        self.stats.input_fits += 1
        return loss

    def forget(self, seq: int) -> list[Tensor | None] | None:
        """Drop step seq, whose gradient will never come (its consumer restarted). When it still
        owed its input gradients (locked rules, backprop targets, delayed): zeros to send in
        their place, so its producers learn nothing from it; else None."""
        entry = self.pending.pop(seq, None)
        if entry is None or not entry.inputs:
            return None
        if entry.stash is not None and not any(entry.needs_grad):
            return None  # delayed, and its producers were answered at forward time
        needs = entry.needs_grad or [x.requires_grad for x in entry.inputs]
        return [torch.zeros_like(x) if need else None for x, need in zip(entry.inputs, needs)]

    def delay(self, seq: int, leaves: list[Tensor], labels: Tensor | None,
              needs_input_grad: list[bool]) -> StepResult:
        """Forward with the current weights, keeping a copy of them for when seq's gradient
        comes back; no update now. Input gradients go upstream then (bare credits now, for
        inputs that take none)."""
        stash = {name: t.detach().clone() for name, t in
                 [*self.module.named_parameters(), *self.module.named_buffers()]}
        with torch.no_grad():
            h = self.module(*leaves)
        self.pending[seq] = Pending(h, labels, leaves, list(needs_input_grad), stash)
        answered_later = any(needs_input_grad)
        return StepResult(output=h, input_grads=None if answered_later else [None] * len(leaves))

    def apply_stashed(self, entry: Pending, grad: Tensor) -> list[Tensor | None]:
        """The step's gradients at the weights it used: recompute its output with the stash,
        backpropagate grad, put the weight gradients on the current weights and step; the
        input gradients go upstream."""
        params = dict(self.module.named_parameters())
        weights = {name: entry.stash[name].requires_grad_(True) for name in params}
        buffers = {name: t for name, t in entry.stash.items() if name not in params}
        leaves = [x.detach().requires_grad_(need) for x, need in zip(entry.inputs, entry.needs_grad)]
        self.module.train()  # as at forward time: an evaluation pass may have run in between
        h = torch.func.functional_call(self.module, {**weights, **buffers}, tuple(leaves))
        wanted = list(weights.values()) + [x for x in leaves if x.requires_grad]
        grads = torch.autograd.grad(h, wanted, grad, allow_unused=True, materialize_grads=True)
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params.values(), grads):
            p.grad = g
        self.optimizer.step()
        self.stats.steps += 1
        if not any(entry.needs_grad):
            return None  # answered at forward time
        rest = iter(grads[len(params):])
        return [next(rest) if x.requires_grad else None for x in leaves]

    def head_step(self, leaves: list[Tensor], labels: Tensor | None) -> StepResult:
        if labels is None:
            raise ValueError(f"head stage {self.name} needs labels to train")
        output = self.module(*leaves)
        loss = self.objective.loss(output, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.stats.steps += 1
        return StepResult(output=None, input_grads=grads_of(leaves), loss=loss.item(),
                          correct=self.objective.correct(output, labels))

    def evaluate(self, inputs: list[Tensor], labels: Tensor | None) -> StepResult:
        """Forward only: no update, nothing kept. A head without labels reports no loss."""
        self.module.eval()
        with torch.no_grad():
            out = self.module(*[x.to(self.device) for x in inputs])
        return self.scored(out, labels)

    def scored(self, out: Tensor, labels: Tensor | None) -> StepResult:
        """An evaluation's result: a stage's output, or a head's loss and hits on labels."""
        if self.objective is None:
            return StepResult(output=out, input_grads=None)
        if labels is None:
            return StepResult(output=None, input_grads=None)
        labels = labels.to(self.device)
        return StepResult(output=None, input_grads=None,
                          loss=self.objective.loss(out, labels).item(),
                          correct=self.objective.correct(out, labels),
                          scored=self.objective.scored(labels))

    def reset_eval_state(self) -> None:
        """Called before each evaluation pass; a feed-forward stage carries nothing between
        evaluation batches (a recurrent one resets its state)."""

    def synthetic_gradient(self, h: Tensor, labels: Tensor | None) -> Tensor:
        with torch.no_grad():
            g = self.synthesizer(h, labels if self.synthesizer.conditioned else None)
        return g * self.synthesizer.scale

    @property
    def gated(self) -> bool:
        """Whether synthetic updates are scaled by `trust` (`synthetic_gradient.gate`)."""
        return self.rule is not None and self.rule.synthetic and self.synthesizer.gate

    def trust(self) -> float:
        """What a synthetic update's learning rate is multiplied by: the fraction of its targets
        the synthesizer explains when it is gated, else 1."""
        return self.explained.fraction if self.gated else 1.0

    def apply(self, h: Tensor, grad: Tensor, lr_scale: float = 1.0) -> None:
        """Backpropagate grad from h into the module (and its leaf inputs), then step, with the
        learning rate times lr_scale for this step only (schedulers see theirs unchanged)."""
        self.optimizer.zero_grad(set_to_none=True)
        h.backward(grad)
        rates = [group["lr"] for group in self.optimizer.param_groups]
        for group, lr in zip(self.optimizer.param_groups, rates):
            group["lr"] = lr * lr_scale  # a new object: a tensor rate is not scaled in place
        self.optimizer.step()
        for group, lr in zip(self.optimizer.param_groups, rates):
            group["lr"] = lr
        self.stats.steps += 1

    def backpropagate(self, inputs: list[Tensor], needs_grad: list[bool],
                      grad: Tensor) -> list[Tensor | None]:
        """Input gradients of the module for an output gradient, by a fresh forward pass with
        the current weights: the pass that made the output is gone (its weights were updated in
        place since). Buffers are copied, so batch-norm running statistics count the batch once."""
        leaves = [x.detach().requires_grad_(need) for x, need in zip(inputs, needs_grad, strict=True)]
        return leaf_grads(self.fresh_forward(leaves), leaves, grad)

    def fresh_forward(self, inputs: list[Tensor]) -> Tensor:
        """The module in training mode, with its current weights, on copies of its buffers:
        a pass that is not a training step leaves batch-norm statistics alone."""
        state = {**dict(self.module.named_parameters()),
                 **{name: b.clone() for name, b in self.module.named_buffers()}}
        self.module.train()
        return torch.func.functional_call(self.module, state, tuple(inputs))

    def fit_synthesizer(self, h: Tensor, labels: Tensor | None, grad: Tensor) -> float:
        loss = fit(self.synthesizer, self.sg_optimizer, grad, h,
                   labels if self.synthesizer.conditioned else None)
        if self.synthesizer.gate:
            self.explained.add(loss, grad)
        self.stats.sg_fits += 1
        return loss

    def state_dict(self) -> dict:
        """Everything learned and counted: module, optimizer, synthesizer and its optimizer,
        statistics. Steps in flight (the pending table) are not state: a restored stage starts
        with none. Plain tensors and numbers only,
        so `torch.load(weights_only=True)` reads it back."""
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "stats": asdict(self.stats), "last_seq": self.last_seq,
                 "explained": asdict(self.explained)}
        if self.synthesizer is not None:
            state["synthesizer"] = self.synthesizer.state_dict()
            state["sg_optimizer"] = self.sg_optimizer.state_dict()
        if self.synthetic_input is not None:
            state["synthetic_input"] = self.synthetic_input.state_dict()
            state["input_optimizer"] = self.input_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved, into a stage built with the same settings."""
        for part, own in (("synthesizer", self.synthesizer), ("synthetic_input", self.synthetic_input)):
            if (part in state) != (own is not None):
                raise ValueError(f"stage {self.name}: the state {'has' if part in state else 'lacks'}"
                                 f" a {part.replace('_', ' ')} and this stage does not match")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.synthesizer is not None:
            self.synthesizer.load_state_dict(state["synthesizer"])
            self.sg_optimizer.load_state_dict(state["sg_optimizer"])
        if self.synthetic_input is not None:
            self.synthetic_input.load_state_dict(state["synthetic_input"])
            self.input_optimizer.load_state_dict(state["input_optimizer"])
        self.stats = StageStats(**state["stats"])
        self.explained = Explained(**state.get("explained", {}))  # none in older checkpoints
        self.last_seq = int(state["last_seq"])
        self.pending.clear()


def leaf_grads(h: Tensor, leaves: list[Tensor], grad: Tensor) -> list[Tensor | None]:
    """The gradient of each leaf that asked for one, for the output gradient grad at h (zeros
    where the module ignores a leaf), without touching any parameter's .grad."""
    wanted = [x for x in leaves if x.requires_grad]
    grads = iter(torch.autograd.grad(h, wanted, grad, allow_unused=True, materialize_grads=True)
                 if wanted else ())
    return [next(grads) if x.requires_grad else None for x in leaves]


def grads_of(leaves: list[Tensor]) -> list[Tensor | None]:
    """The gradient of each leaf that asked for one; zeros for an input the module ignores (its
    producer is still owed a gradient), None for a leaf that asked for none."""
    return [(x.grad if x.grad is not None else torch.zeros_like(x)) if x.requires_grad else None
            for x in leaves]
