"""Fully connected nodes, as in the paper's MNIST FCN: each layer FC + batch norm + ReLU."""
import torch
from torch import Tensor, nn


class Block(nn.Module):
    """One FC layer: flatten, Linear(d_in, d_out), BatchNorm1d, ReLU."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out),
                                 nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Classifier(nn.Module):
    """The head's layer: flatten, then Linear(d_in, classes) to logits.

    Flattening lets it sit after a conv node too (d_in = C * H * W).
    """

    def __init__(self, d_in: int, classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d_in, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Join(nn.Module):
    """A fan-in node: concatenates its inputs' features, then one FC layer like Block.

    d_in lists the feature count of each input, in the order of the node's in-edges.
    """

    def __init__(self, d_in: list[int], d_out: int):
        super().__init__()
        self.block = Block(sum(d_in), d_out)

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.block(torch.cat([x.flatten(1) for x in inputs], dim=1))
