"""One node's learning step: its module, optimizer and (for DNI) synthesizer, with no transport.

The node runtime calls `forward(seq, ...)` when an activation arrives and `backward(seq, grad)`
when the gradient for that seq comes back (summed over all consumers); it ships what the calls
return. Modes, for a node's outgoing interface:

- "dni" / "cdni": update at once with the synthetic gradient g = M(h) (cDNI: M(h, labels))
  and fit M when the real gradient for seq comes back. What goes upstream, as the target of
  the upstream synthesizer, is set by the synthesizer's `target`:
    "bootstrap" (the paper's): the gradient that g implies for the inputs, sent at once;
    "backprop": the gradient that came back, backpropagated through the module when it
    arrives (recomputed with the current weights), so that every synthesizer regresses onto
    the true gradient of the loss, one round trip late. Updates stay synthetic and unlocked;
    the upstream node's window waits longer for its answer.
- "backprop": locked; keep the graph until the gradient comes back, then update and send the
  true input gradients upstream. Calls must alternate forward(t), backward(t): a later
  forward's graph would be invalidated by the earlier batch's in-place update.
- "bp_lambda": the paper's BP(lambda) (Jaderberg et al. 2016, supplement A): locked like
  backprop, but the gradient applied to h is the mixture
      lam * grad + (1 - lam) * M(h)
  where grad is what came back from downstream (itself the downstream node's mixture, so the
  rule is recursive: lam = 1 is backprop, lam = 0 is pure synthetic gradients). The mixture is
  what gets backpropagated into the module and on to the upstream node; M is fitted on grad.

A head stage owns the loss (cross-entropy): it updates from the true gradient in `forward` and
returns the true input gradients, the loss and the number of correct predictions.
"""
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from dni_mesh.synthetic import Synthesizer, fit

MODES = ("backprop", "dni", "cdni", "bp_lambda")
SYNTHETIC_MODES = ("dni", "cdni", "bp_lambda")


@dataclass
class StageConfig:
    mode: str = "dni"          # "backprop" | "dni" | "cdni" | "bp_lambda"
    bp_lambda: float = 1.0     # bp_lambda: weight of the gradient from downstream
    max_pending: int = 64      # bounded pending table; overflow evicts the oldest (counted)


@dataclass
class StepResult:
    output: Tensor | None                   # activation for downstream (detached); None for a head
    input_grads: list[Tensor | None] | None  # per input, gradient to send upstream now
    loss: float | None = None               # head: task loss
    correct: int | None = None              # head: correct predictions in the batch


@dataclass
class BackwardResult:
    input_grads: list[Tensor | None] | None  # backprop/bp_lambda: gradients to send upstream
    sg_loss: float | None = None            # synthesizer regression loss, when it was fitted


@dataclass
class StageStats:
    steps: int = 0      # module optimizer steps
    sg_fits: int = 0    # synthesizer regression steps
    stale: int = 0      # backward for a seq already answered or evicted
    unknown: int = 0    # backward for a seq never taken forward in training
    evicted: int = 0    # pending entries dropped because the table was full


@dataclass
class Pending:
    """What a node keeps for a seq until its gradient comes back."""
    h: Tensor                                # output; attached to the graph in locked modes
    labels: Tensor | None
    inputs: list[Tensor] = field(default_factory=list)   # leaves: locked modes, target backprop
    needs_grad: list[bool] = field(default_factory=list)  # target backprop: inputs to answer


class Stage:
    """One node's module + optimizer (+ synthesizer). Head stages own the loss."""

    def __init__(self, name: str, module: nn.Module, optimizer: Optimizer,
                 synthesizer: Synthesizer | None, sg_optimizer: Optimizer | None,
                 config: StageConfig, head: bool = False, num_classes: int | None = None,
                 device: torch.device | str = "cpu"):
        if config.mode not in MODES:
            raise ValueError(f"stage {name}: mode {config.mode!r}, expected one of {MODES}")
        if config.max_pending < 1:
            raise ValueError(f"stage {name}: max_pending must be at least 1")
        if not head and config.mode in SYNTHETIC_MODES and (synthesizer is None or sg_optimizer is None):
            raise ValueError(f"stage {name}: mode {config.mode} needs a synthesizer and its optimizer")
        if (not head and config.mode in ("dni", "cdni")
                and synthesizer.conditioned != (config.mode == "cdni")):
            raise ValueError(f"stage {name}: mode {config.mode} needs a "
                             f"{'' if config.mode == 'cdni' else 'un'}conditioned synthesizer")
        self.name = name
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.optimizer = optimizer
        self.synthesizer = synthesizer.to(self.device) if synthesizer is not None else None
        self.sg_optimizer = sg_optimizer
        self.config = config
        self.head = head
        self.num_classes = num_classes
        self.stats = StageStats()
        self.pending: OrderedDict[int, Pending] = OrderedDict()
        self.last_seq = -1  # highest seq taken forward in training: tells stale from unknown

    def forward(self, seq: int, inputs: list[Tensor], labels: Tensor | None,
                needs_input_grad: list[bool] | None = None, train: bool = True) -> StepResult:
        """Run the module on inputs (called as module(*inputs)).

        needs_input_grad: per input, whether to return its gradient; None asks for every
        floating-point input. train=False evaluates: no update, nothing kept.
        """
        labels = labels.to(self.device) if labels is not None else None
        if not train:
            return self.evaluate(inputs, labels)
        if needs_input_grad is None:
            needs_input_grad = [x.is_floating_point() for x in inputs]
        # target backprop: input gradients come later, from backward; the synthetic update skips them
        deferred = (not self.head and self.config.mode in ("dni", "cdni")
                    and self.synthesizer.target == "backprop" and any(needs_input_grad))
        leaves = [x.to(self.device).detach().requires_grad_(need and not deferred)
                  for x, need in zip(inputs, needs_input_grad, strict=True)]
        self.module.train()
        self.last_seq = max(self.last_seq, seq)
        if self.head:
            return self.head_step(leaves, labels)
        h = self.module(*leaves)
        if self.config.mode in ("backprop", "bp_lambda"):
            self.keep(seq, Pending(h, labels, leaves))
            return StepResult(output=h.detach(), input_grads=None)
        self.apply(h, self.synthetic_gradient(h.detach(), labels))
        if deferred:
            self.keep(seq, Pending(h.detach(), labels, leaves, list(needs_input_grad)))
            return StepResult(output=h.detach(), input_grads=None)
        self.keep(seq, Pending(h.detach(), labels))
        return StepResult(output=h.detach(), input_grads=grads_of(leaves))

    def backward(self, seq: int, grad: Tensor) -> BackwardResult:
        """Take the gradient for seq's output (summed over consumers).

        DNI: fit the synthesizer on it. Locked modes: update now and return input gradients.
        A stale or unknown seq is counted and ignored.
        """
        entry = self.pending.pop(seq, None)
        if entry is None:
            if seq <= self.last_seq:
                self.stats.stale += 1
            else:
                self.stats.unknown += 1
            return BackwardResult(input_grads=None)
        grad = grad.to(device=self.device, dtype=entry.h.dtype)  # the wire may carry less
        if self.config.mode == "backprop":
            self.apply(entry.h, grad)
            return BackwardResult(input_grads=grads_of(entry.inputs))
        if self.config.mode == "bp_lambda":
            lam = self.config.bp_lambda
            synthetic = self.synthetic_gradient(entry.h.detach(), entry.labels)
            self.apply(entry.h, lam * grad + (1 - lam) * synthetic)
            return BackwardResult(input_grads=grads_of(entry.inputs),
                                  sg_loss=self.fit_synthesizer(entry.h.detach(), entry.labels, grad))
        sg_loss = self.fit_synthesizer(entry.h, entry.labels, grad)
        input_grads = self.backpropagate(entry.inputs, entry.needs_grad, grad) if entry.inputs else None
        return BackwardResult(input_grads=input_grads, sg_loss=sg_loss)

    def head_step(self, leaves: list[Tensor], labels: Tensor | None) -> StepResult:
        if labels is None:
            raise ValueError(f"head stage {self.name} needs labels")
        logits = self.module(*leaves)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.stats.steps += 1
        return StepResult(output=None, input_grads=grads_of(leaves), loss=loss.item(),
                          correct=count_correct(logits, labels))

    def evaluate(self, inputs: list[Tensor], labels: Tensor | None) -> StepResult:
        self.module.eval()
        with torch.no_grad():
            out = self.module(*[x.to(self.device) for x in inputs])
        if not self.head:
            return StepResult(output=out, input_grads=None)
        if labels is None:
            return StepResult(output=None, input_grads=None)
        return StepResult(output=None, input_grads=None,
                          loss=F.cross_entropy(out, labels).item(),
                          correct=count_correct(out, labels))

    def synthetic_gradient(self, h: Tensor, labels: Tensor | None) -> Tensor:
        with torch.no_grad():
            g = self.synthesizer(h, labels if self.synthesizer.conditioned else None)
        return g * self.synthesizer.scale

    def apply(self, h: Tensor, grad: Tensor) -> None:
        """Backpropagate grad from h into the module (and its leaf inputs), then step."""
        self.optimizer.zero_grad(set_to_none=True)
        h.backward(grad)
        self.optimizer.step()
        self.stats.steps += 1

    def backpropagate(self, inputs: list[Tensor], needs_grad: list[bool],
                      grad: Tensor) -> list[Tensor | None]:
        """Input gradients of the module for an output gradient, by a fresh forward pass with
        the current weights: the pass that made the output is gone (its weights were updated in
        place since). Buffers are copied, so batch-norm running statistics count the batch once."""
        leaves = [x.detach().requires_grad_(need) for x, need in zip(inputs, needs_grad, strict=True)]
        state = {**dict(self.module.named_parameters()),
                 **{name: b.clone() for name, b in self.module.named_buffers()}}
        self.module.train()
        h = torch.func.functional_call(self.module, state, tuple(leaves))
        wanted = [x for x in leaves if x.requires_grad]
        grads = iter(torch.autograd.grad(h, wanted, grad))
        return [next(grads) if x.requires_grad else None for x in leaves]

    def fit_synthesizer(self, h: Tensor, labels: Tensor | None, grad: Tensor) -> float:
        loss = fit(self.synthesizer, self.sg_optimizer, grad, h,
                   labels if self.synthesizer.conditioned else None)
        self.stats.sg_fits += 1
        return loss

    def keep(self, seq: int, entry: Pending) -> None:
        while len(self.pending) >= self.config.max_pending:
            self.pending.popitem(last=False)
            self.stats.evicted += 1
        self.pending[seq] = entry


def grads_of(leaves: list[Tensor]) -> list[Tensor | None]:
    return [x.grad if x.requires_grad else None for x in leaves]


def count_correct(logits: Tensor, labels: Tensor) -> int:
    return int((logits.argmax(dim=1) == labels).sum().item())
