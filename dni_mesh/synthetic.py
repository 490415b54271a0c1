"""Synthetic models of a decoupled neural interface (Jaderberg et al. 2016, arXiv 1608.05343).

A node updates the moment it has produced its output h, using a *synthetic gradient*
M(h, labels?) ~ dL/dh that a small local model predicts; the real gradient arrives later and
only trains M (by L2 regression). The last layer of M starts at zero weights and bias, so a
fresh interface sends "no gradient" rather than noise. For complete unlock a node can also be
fed a *synthetic input* I(x) predicted from the source data.
"""
from collections.abc import Iterable
from dataclasses import dataclass, field
from math import prod

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class SyntheticGradientConfig:
    """Shape and training of a synthesizer.

    hidden: hidden layers (0 = linear, the paper's best for cDNI); width: units of a hidden FC
    layer; channels and kernel_size: the same for a conv synthesizer (5x5 'same' convs).
    kind: "mlp" (flat h; "linear" is the same with hidden forced to 0), "conv" for (C, H, W)
    activations, "auto" picks conv for 3-d activations and mlp otherwise.
    scale: the prediction is multiplied by it before the node applies it (M is still fitted
    on the raw target), a damping trick for the first steps.
    gate: the node's learning rate is multiplied, at each synthetic update, by the fraction of
    its targets M explains (`Explained`), so it does not take full Adam steps on the noise of a
    synthesizer that has not learnt yet; what keeps DNI learning at deep windows.
    target: what the synthesizer *upstream* of this node is fitted on, "bootstrap" (the
    paper's) or "backprop": it becomes the node's update rule (`dni_mesh.update.Target`).
    """

    hidden: int = 0
    width: int = 1024
    channels: int = 128
    kernel_size: int = 5
    conditioned: bool = False
    kind: str = "auto"
    optimizer: dict = field(default_factory=lambda: {"name": "adam", "lr": 1e-4})
    scale: float = 1.0
    target: str = "bootstrap"
    gate: bool = False


def moving_average(average: float | None, value: float, decay: float) -> float:
    """An exponential moving average's next value; the first value starts it."""
    return value if average is None else decay * average + (1 - decay) * value


@dataclass
class Explained:
    """The fraction of its targets a synthesizer predicts: 1 - E[fit loss] / E[target^2],
    clipped to [0, 1], both moving averages over its fits (0 before the first). A fresh or
    lagging synthesizer scores near 0, one that tracks its targets near 1."""

    decay: float = 0.9
    error: float | None = None  # moving average of the regression loss (MSE before each fit)
    power: float | None = None  # moving average of the targets' mean square

    def add(self, loss: float, target: Tensor) -> None:
        self.error = moving_average(self.error, loss, self.decay)
        self.power = moving_average(self.power, target.double().pow(2).mean().item(), self.decay)

    @property
    def fraction(self) -> float:
        if not self.power:
            return 0.0
        return min(1.0, max(0.0, 1.0 - self.error / self.power))


def zero_(layer: nn.Module) -> nn.Module:
    """Zero a layer's weight and bias: the interface starts silent."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def one_hot(labels: Tensor, num_classes: int, like: Tensor) -> Tensor:
    """Labels as one-hot rows; a negative label (a token not scored) is a row of zeros."""
    labels = labels.long()
    return (F.one_hot(labels.clamp(min=0), num_classes) * (labels >= 0)[..., None]).to(dtype=like.dtype)


class Synthesizer(nn.Module):
    """M(h, labels?) -> predicted dL/dh, of h's shape.

    shape is one sample's activation shape (no batch dimension). For cDNI (config.conditioned)
    the one-hot labels are concatenated to the flattened input, or broadcast as extra channels
    for a conv synthesizer; a sample may carry several labels (labels_per_sample, e.g. one per
    task of a multi-task stream), each one-hot. Hidden layers are FC (or conv) + BatchNorm +
    ReLU, as in the paper.
    """

    def __init__(self, shape: tuple[int, ...], num_classes: int | None,
                 config: SyntheticGradientConfig, labels_per_sample: int = 1):
        super().__init__()
        if config.conditioned and not num_classes:
            raise ValueError("a conditioned (cDNI) synthesizer needs num_classes")
        kind = config.kind
        if kind == "auto":
            kind = "conv" if len(shape) == 3 else "mlp"
        if kind not in ("linear", "mlp", "conv"):
            raise ValueError(f"synthesizer kind {config.kind!r}: expected auto, linear, mlp or conv")
        if kind == "conv" and len(shape) != 3:
            raise ValueError(f"a conv synthesizer needs (C, H, W) activations, got shape {shape}")
        self.shape = tuple(shape)
        self.kind = kind
        self.conditioned = config.conditioned
        self.num_classes = num_classes
        self.scale = config.scale
        self.gate = config.gate
        extra = num_classes * labels_per_sample if config.conditioned else 0
        hidden = 0 if kind == "linear" else config.hidden
        if kind == "conv":
            self.net = conv_stack(shape[0] + extra, shape[0], hidden, config.channels,
                                  config.kernel_size)
        else:
            self.net = fc_stack(prod(shape) + extra, prod(shape), hidden, config.width)

    def forward(self, h: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.conditioned and labels is None:
            raise ValueError("a conditioned (cDNI) synthesizer needs the labels")
        if self.kind == "conv":
            x = h
            if self.conditioned:
                code = one_hot(labels, self.num_classes, h).flatten(1)[:, :, None, None]
                x = torch.cat([h, code.expand(-1, -1, *h.shape[2:])], dim=1)
            return self.net(x)
        x = h.flatten(1)
        if self.conditioned:
            x = torch.cat([x, one_hot(labels, self.num_classes, h).flatten(1)], dim=1)
        return self.net(x).view_as(h)


def fc_stack(d_in: int, d_out: int, hidden: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(hidden):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.BatchNorm1d(width), nn.ReLU()]
    layers.append(zero_(nn.Linear(width if hidden else d_in, d_out)))
    return nn.Sequential(*layers)


def conv_stack(c_in: int, c_out: int, hidden: int, channels: int, k: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(hidden):
        layers += [nn.Conv2d(c_in if i == 0 else channels, channels, k, padding=k // 2),
                   nn.BatchNorm2d(channels), nn.ReLU()]
    layers.append(zero_(nn.Conv2d(channels if hidden else c_in, c_out, k, padding=k // 2)))
    return nn.Sequential(*layers)


class SyntheticInput(nn.Module):
    """I(x_source) -> predicted input of a node, for complete unlock.

    The node can run on I(x) without waiting for its upstream peer; I is fitted by L2
    regression onto the real activation when it arrives (see `fit`). An MLP over the flattened
    source data (FC + BatchNorm + ReLU hidden layers), reshaped to the target's shape.
    """

    def __init__(self, source_shape: tuple[int, ...], target_shape: tuple[int, ...],
                 hidden: int = 2, width: int = 256):
        super().__init__()
        self.target_shape = tuple(target_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        d = prod(source_shape)
        for _ in range(hidden):
            layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, prod(target_shape)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).view(x.shape[0], *self.target_shape)


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, target: Tensor, *inputs) -> float:
    """One L2 regression step of model(*inputs) onto target; returns the loss before the step.

    The loss is the mean squared error over all elements. Targets are detached: a synthesizer
    regresses onto the gradient it was sent, it never backpropagates into it.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = F.mse_loss(model(*inputs), target.detach())
    loss.backward()
    optimizer.step()
    return loss.item()


def make_optimizer(params: Iterable[nn.Parameter], spec: dict) -> torch.optim.Optimizer:
    """Build an optimizer from {"name": "adam"|"sgd", "lr": ..., other keyword arguments}."""
    kwargs = dict(spec)
    name = kwargs.pop("name", "adam")
    if name == "adam":
        return torch.optim.Adam(params, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(params, **kwargs)
    raise ValueError(f"optimizer name {name!r}: expected 'adam' or 'sgd'")
