"""A recurrent node's learning step: truncated BPTT over chunks, with DNI in time and in space.

The module follows the protocol `module(*inputs, state) -> (y, new_state)`: inputs hold one
chunk of T time steps ([B, T, d], or int64 token ids [B, T]), y is [B, T, h] (logits for a
head) and state is a tensor or a tuple of tensors with the batch first (None: the module
starts from its zero state). The stage carries the state from one training chunk to the next,
detached at the boundary: chunks must arrive in order, each row continuing the previous chunk.

Without a time synthesizer this is truncated BPTT(T): no gradient crosses a boundary. With
one (Jaderberg et al. 2016, section 3.2) the stage adds M_t(s_new), the predicted gradient of
the loss beyond the chunk, as the gradient of the chunk's final state and updates at once. The
same backward pass yields the gradient that reaches the chunk's initial state s_prev: this
chunk's loss (or output gradient) plus M_t(s_new) passed back through it. That is the
bootstrapped target onto which M_t's prediction for s_prev is fitted. The synthesizer's scale
multiplies M_t(s_new) in both uses, so it acts as a discount on the future.

Between nodes the rules of `dni_mesh.update` hold, on the chunk's output y [B, T, h] with the
synthesizer applied per time step: `Backprop` keeps the graph until the gradient of y comes
back, then backpropagates it (and M_t(s_new)) and updates (window 1); `SyntheticGradient` with
bootstrap targets updates at once from M(y) and fits M when the true gradient arrives. A head
owns an objective (`dni_mesh.language_model.LanguageModel`) and may own a time synthesizer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from dni_mesh.objective import Objective
from dni_mesh.stage import BackwardResult, Pending, Stage, StageStats, StepResult, grads_of
from dni_mesh.synthetic import Synthesizer, fit, moving_average
from dni_mesh.update import Backprop, SyntheticGradient, UpdateRule

State = Tensor | tuple[Tensor, ...]


@dataclass
class RecurrentPending(Pending):
    """A locked chunk also keeps its boundary states until its output gradient comes back."""
    start: State | None = None   # the carried state it began from (leaves under a time synthesizer)
    end: State | None = None     # its final state, attached to the graph


@dataclass
class RecurrentStats(StageStats):
    time_fits: int = 0          # time synthesizer regression steps
    time_loss: float = 0.0      # the time synthesizer's last regression loss


def parts(state: State) -> tuple[Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def rebuild(tensors: tuple[Tensor, ...] | list[Tensor], like_tuple: bool) -> State:
    return tuple(tensors) if like_tuple else tensors[0]


def flat(state: State) -> Tensor:
    """The state as one [B, size] tensor: what a time synthesizer reads and predicts."""
    return torch.cat([s.reshape(s.shape[0], -1) for s in parts(state)], dim=1)


def detached(state: State | None, requires_grad: bool = False) -> State | None:
    if state is None:
        return None
    return rebuild([s.detach().requires_grad_(requires_grad) for s in parts(state)],
                   isinstance(state, tuple))


def joined(pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Several (root, gradient) pairs as one, so that one backward pass carries them all."""
    if len(pairs) == 1:
        return pairs[0]
    return (torch.cat([root.reshape(-1) for root, _ in pairs]),
            torch.cat([grad.reshape(-1) for _, grad in pairs]))


class RecurrentStage(Stage):
    """A Stage whose module is recurrent: chunks of T steps, state carried between them.

    time_synthesizer (with time_sg_optimizer): DNI in time, an unconditioned Synthesizer over
    the flattened state ((state size,)); None is truncated BPTT. Rules: Backprop or
    SyntheticGradient with bootstrap targets; a head takes an objective instead.

    A gated synthesizer (`SyntheticGradientConfig.gate`) multiplies the learning rate of each
    synthetic update (the chunk's M(y) plus M_t(end), at forward time) by the fraction of its
    targets it explains (`Stage.trust`); a head and a locked layer update at the full rate.

    time_target_decay: None (the default) fits M_t onto the raw bootstrapped target. A decay
    beta in (0, 1) fits it onto target / sigma instead, sigma^2 an exponential moving average
    (decay beta) of the targets' mean square, and multiplies its prediction by sigma wherever
    it is used: M_t then learns at a rate relative to the size of its targets, which are tiny
    (a gradient of a loss averaged over batch and chunk) and grow as the module learns.
    """

    def __init__(self, name: str, module: nn.Module, optimizer: Optimizer, *,
                 rule: UpdateRule | None = None, objective: Objective | None = None,
                 synthesizer: Synthesizer | None = None, sg_optimizer: Optimizer | None = None,
                 time_synthesizer: Synthesizer | None = None,
                 time_sg_optimizer: Optimizer | None = None,
                 time_target_decay: float | None = None,
                 window: int = 1, device: torch.device | str = "cpu"):
        if rule is not None and not self.supports(rule):
            raise ValueError(f"recurrent stage {name}: rule {rule} is not supported; use "
                             "backprop or dni/cdni with bootstrap targets")
        if (time_synthesizer is None) != (time_sg_optimizer is None):
            raise ValueError(f"recurrent stage {name}: give a time synthesizer and its "
                             "optimizer, or neither (truncated BPTT)")
        if time_synthesizer is not None and time_synthesizer.conditioned:
            raise ValueError(f"recurrent stage {name}: the time synthesizer reads the state "
                             "alone; it cannot be conditioned on labels")
        if time_target_decay is not None and not 0.0 < time_target_decay < 1.0:
            raise ValueError(f"recurrent stage {name}: time_target_decay {time_target_decay} "
                             "must be in (0, 1), or None")
        super().__init__(name, module, optimizer, rule=rule, objective=objective,
                         synthesizer=synthesizer, sg_optimizer=sg_optimizer, window=window,
                         device=device)
        self.time_synthesizer = (time_synthesizer.to(self.device)
                                 if time_synthesizer is not None else None)
        self.time_sg_optimizer = time_sg_optimizer
        self.time_target_decay = time_target_decay
        self.time_target_ms: float | None = None   # running mean square of M_t's targets
        self.stats = RecurrentStats()
        self.state: State | None = None        # carried training state, detached
        self.eval_state: State | None = None   # carried evaluation state, detached

    @staticmethod
    def supports(rule: UpdateRule) -> bool:
        """Backprop, or synthetic gradients with bootstrap targets."""
        return isinstance(rule, Backprop) or (isinstance(rule, SyntheticGradient)
                                              and not rule.defers_input_grads)

    def forward(self, seq: int, inputs: list[Tensor], labels: Tensor | None,
                needs_input_grad: list[bool] | None = None) -> StepResult:
        """Train on chunk seq, starting from the carried state; carry its final state on."""
        if len(self.pending) >= self.window:
            raise RuntimeError(f"stage {self.name}: forward of seq {seq} with {self.window} steps "
                               "already waiting for their gradient (the window is full)")
        if self.head and labels is None:
            raise ValueError(f"head stage {self.name} needs labels to train")
        labels = labels.to(self.device) if labels is not None else None
        if needs_input_grad is None:
            needs_input_grad = [x.is_floating_point() for x in inputs]
        leaves = [x.to(self.device).detach().requires_grad_(need)
                  for x, need in zip(inputs, needs_input_grad, strict=True)]
        self.module.train()
        self.last_seq = max(self.last_seq, seq)
        start = detached(self.state, requires_grad=self.time_synthesizer is not None)
        y, end = self.module(*leaves, start)
        self.state = detached(end)
        if self.head:
            loss = self.objective.loss(y, labels)
            self.update([(loss, torch.ones_like(loss))], start, end)
            return StepResult(output=None, input_grads=grads_of(leaves), loss=loss.item(),
                              correct=self.objective.correct(y, labels))
        if self.rule.locked:
            self.pending[seq] = RecurrentPending(y, labels, leaves, start=start, end=end)
            return StepResult(output=y.detach(), input_grads=None)
        h, step_labels = per_step(y.detach(), labels)
        self.update([(y, self.synthetic_gradient(h, step_labels).view_as(y))], start, end,
                    self.trust())
        self.pending[seq] = RecurrentPending(h, step_labels)   # fitted per time step
        return StepResult(output=y.detach(), input_grads=grads_of(leaves))

    def backward(self, seq: int, grad: Tensor) -> BackwardResult:
        """Take the gradient of chunk seq's output [B, T, h] (summed over consumers).

        SyntheticGradient: fit the synthesizer on it, per time step. Backprop: backpropagate it
        (with M_t at the chunk's end), update and return the input gradients. A stale or
        unknown seq is counted and ignored.
        """
        if not isinstance(self.rule, Backprop) or seq not in self.pending:
            return super().backward(seq, grad.reshape(-1, grad.shape[-1]))
        entry = self.pending.pop(seq)
        grad = grad.to(device=self.device, dtype=entry.h.dtype)  # the wire may carry less
        self.update([(entry.h, grad)], entry.start, entry.end)
        return BackwardResult(input_grads=grads_of(entry.inputs))

    def update(self, pairs: list[tuple[Tensor, Tensor]], start: State | None,
               end: State, lr_scale: float = 1.0) -> None:
        """Backpropagate the chunk's gradients, plus M_t(end) under DNI in time, then step
        with the learning rate times lr_scale; fit M_t's prediction for start onto the
        gradient that reached it."""
        if self.time_synthesizer is not None:
            with torch.no_grad():
                future = (self.time_synthesizer(flat(end).detach())
                          * (self.time_synthesizer.scale * self.target_scale()))
            ends = parts(end)
            sizes = [s[0].numel() for s in ends]
            pieces = future.split(sizes, dim=1)
            pairs = pairs + [(s, g.view_as(s)) for s, g in zip(ends, pieces, strict=True)]
        self.apply(*joined(pairs), lr_scale)
        if self.time_synthesizer is not None and start is not None:
            target = flat(tuple(s.grad if s.grad is not None else torch.zeros_like(s)
                                for s in parts(start)))
            if self.time_target_decay is not None:
                self.time_target_ms = moving_average(self.time_target_ms, target.pow(2).mean().item(),
                                                     self.time_target_decay)
                target = target / self.target_scale()
            self.stats.time_loss = fit(self.time_synthesizer, self.time_sg_optimizer, target,
                                       flat(start).detach())
            self.stats.time_fits += 1

    def target_scale(self) -> float:
        """sigma, the factor between M_t's output and the gradient it stands for (1: no
        normalisation; 0 before the first target under normalisation, M_t being silent)."""
        if self.time_target_decay is None:
            return 1.0
        if self.time_target_ms is None:
            return 0.0
        return max(self.time_target_ms, 1e-30) ** 0.5

    def evaluate(self, inputs: list[Tensor], labels: Tensor | None) -> StepResult:
        """Forward only, from the carried evaluation state (never the training state).

        The node core must call `reset_eval_state` before the first chunk of every evaluation
        pass: a pass reads its split from the start, where the state is zeros.
        """
        self.module.eval()
        with torch.no_grad():
            out, self.eval_state = self.module(*[x.to(self.device) for x in inputs],
                                               self.eval_state)
        return self.scored(out, labels)

    def reset_eval_state(self) -> None:
        """Start the next evaluation chunk from the zero state."""
        self.eval_state = None

    def reset_state(self) -> None:
        """Start the next training chunk from the zero state (a new, unrelated stream)."""
        self.state = None

    def state_dict(self) -> dict:
        """Stage's state plus the time synthesizer and the carried training state, so that a
        restored stage continues the stream exactly (plain tensors: weights_only loads it)."""
        state = super().state_dict() | {"stats": asdict(self.stats)}
        state["carried"] = [] if self.state is None else list(parts(self.state))
        state["carried_is_tuple"] = isinstance(self.state, tuple)
        if self.time_synthesizer is not None:
            state["time_synthesizer"] = self.time_synthesizer.state_dict()
            state["time_sg_optimizer"] = self.time_sg_optimizer.state_dict()
            if self.time_target_ms is not None:
                state["time_target_ms"] = self.time_target_ms
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved, into a stage built with the same settings."""
        if ("time_synthesizer" in state) != (self.time_synthesizer is not None):
            raise ValueError(f"stage {self.name}: the state and this stage disagree on having "
                             "a time synthesizer")
        stats = state["stats"]
        super().load_state_dict(state | {"stats": {f.name: stats[f.name]
                                                   for f in fields(StageStats)}})
        self.stats = RecurrentStats(**stats)
        carried = [s.to(self.device) for s in state["carried"]]
        self.state = rebuild(carried, state["carried_is_tuple"]) if carried else None
        if self.time_synthesizer is not None:
            self.time_synthesizer.load_state_dict(state["time_synthesizer"])
            self.time_sg_optimizer.load_state_dict(state["time_sg_optimizer"])
            self.time_target_ms = state.get("time_target_ms")


def per_step(y: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A chunk's output [B, T, h] (and labels [B, T]) as B*T samples of one time step."""
    return y.reshape(-1, y.shape[-1]), labels.reshape(-1) if labels is not None else None
