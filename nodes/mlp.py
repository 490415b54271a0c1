"""Fully connected nodes, as in the paper's MNIST FCN: each layer FC + batch norm + ReLU."""
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
