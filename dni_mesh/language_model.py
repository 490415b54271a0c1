"""The language-model objective: cross entropy per token over a chunk of T time steps.

A recurrent head emits logits [B, T, V] for targets [B, T] (the next tokens). Positions whose
target is IGNORE score nothing (a copy task's input phase): the loss is the mean over the
scored tokens, 0 for a chunk with none. Bits per character (PTB characters) and perplexity
(PTB words) are both functions of that mean loss in nats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # a target that is not scored (torch's default ignore_index)


@dataclass(frozen=True)
class LanguageModel:
    """Cross entropy per scored token; `correct` counts argmax hits among scored tokens."""

    def loss(self, output: Tensor, labels: Tensor) -> Tensor:
        total = F.cross_entropy(output.reshape(-1, output.shape[-1]), labels.reshape(-1),
                                ignore_index=IGNORE, reduction="sum")
        return total / max(self.scored(labels), 1)

    def correct(self, output: Tensor, labels: Tensor) -> int:
        hits = (output.argmax(dim=-1) == labels) & (labels != IGNORE)
        return int(hits.sum().item())

    def scored(self, labels: Tensor) -> int:
        """How many tokens of the batch count: the denominator of the loss and of accuracy."""
        return int((labels != IGNORE).sum().item())


def bits_per_token(loss: float) -> float:
    """Mean cross entropy in nats -> bits per token (bits per character at character level)."""
    return loss / math.log(2)


def perplexity(loss: float) -> float:
    """Mean cross entropy in nats -> perplexity (the word-level measure)."""
    return math.exp(loss)
