"""Objectives: the loss a head node owns, and what it measures on a batch.

The head's Stage calls `loss` to train and `correct` to report accuracy; a new task (a sequence loss,
regression) is a new objective, not a new kind of stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch.nn.functional as F
from torch import Tensor


class Objective(Protocol):
    def loss(self, output: Tensor, labels: Tensor) -> Tensor:
        """The scalar to minimise, mean over the batch."""

    def correct(self, output: Tensor, labels: Tensor) -> int:
        """How many samples of the batch the output gets right (for accuracy)."""

    def scored(self, labels: Tensor) -> int:
        """How many predictions `correct` counts over: accuracy's denominator, the loss's weight."""


@dataclass(frozen=True)
class Classification:
    """Cross entropy over `num_classes` logits; accuracy by argmax."""
    num_classes: int

    def loss(self, output: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(output, labels)

    def correct(self, output: Tensor, labels: Tensor) -> int:
        return int((output.argmax(dim=1) == labels).sum().item())

    def scored(self, labels: Tensor) -> int:
        return len(labels)
