"""Recurrent catalogue modules for `dni_mesh.recurrent.RecurrentStage`.

Each follows the recurrent protocol `module(x, state) -> (y, new_state)` over one chunk:
x is [B, T, d_in] (batch first), state the pair (h, c), each [B, d_hidden], or None for the
zero state. `state_size` is what a time synthesizer over the flattened state must read.
A first layer takes int64 token ids [B, T] instead (`tokens=True`): they are one-hot encoded
over d_in = the vocabulary, so the input weights are the character embedding.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

LSTMState = tuple[Tensor, Tensor]


class LSTM(nn.Module):
    """One LSTM layer: (x, (h, c)) -> (outputs [B, T, d_hidden], (h, c) after the chunk)."""

    def __init__(self, d_in: int, d_hidden: int, tokens: bool = False):
        super().__init__()
        self.d_in = d_in
        self.tokens = tokens
        self.state_size = 2 * d_hidden
        self.lstm = nn.LSTM(d_in, d_hidden, batch_first=True)

    def forward(self, x: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        if self.tokens:
            x = F.one_hot(x, self.d_in).to(self.lstm.weight_ih_l0.dtype)
        hx = None if state is None else (state[0].unsqueeze(0), state[1].unsqueeze(0))
        y, (h, c) = self.lstm(x, hx)
        return y, (h.squeeze(0), c.squeeze(0))


class LSTMHead(nn.Module):
    """An LSTM layer and a linear layer to logits [B, T, vocab]: a language model's head."""

    def __init__(self, d_in: int, d_hidden: int, vocab: int, tokens: bool = False):
        super().__init__()
        self.lstm = LSTM(d_in, d_hidden, tokens)
        self.state_size = self.lstm.state_size
        self.out = nn.Linear(d_hidden, vocab)

    def forward(self, x: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        y, state = self.lstm(x, state)
        return self.out(y), state
