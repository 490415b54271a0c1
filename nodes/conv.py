"""Convolutional nodes for MNIST-sized images: conv + batch norm + ReLU, optionally pooled."""
from torch import Tensor, nn

from nodes.mlp import Classifier


class ConvBlock(nn.Module):
    """Conv2d(c_in, c_out, kernel_size, 'same' padding), BatchNorm2d, ReLU, then an optional
    2x2 max pool that halves height and width. Expects (N, C, H, W) input."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 5, pool: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                                   nn.BatchNorm2d(c_out), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvClassifier(Classifier):
    """Head over conv features: flatten (C, H, W) and map to logits with one Linear layer."""

    def __init__(self, c_in: int, height: int, width: int, classes: int):
        super().__init__(c_in * height * width, classes)
