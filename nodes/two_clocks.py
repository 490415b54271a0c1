"""The two-network system of Jaderberg et al. 2016 (section 3.3): two clocks, one stream.

Network A sees one digit per seq and must say its parity; network B ticks once every k seqs,
sees only A's k outputs and must say how many of the group's digits were below 5. Parity and
"below 5" are independent bits of a digit, so a narrow A trained on parity alone has no reason
to keep the one B needs: B succeeds only if A learns from B's gradient.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DIGITS = 10


class DigitStream:
    """Batches of one noisy one-hot digit per sample; labels [B, 2]: the digit's parity (A's
    task, every seq) and the count of digits below 5 in the group so far (B's task, read at
    each group's last seq).

    Groups are absolute seqs [g*k, g*k + k): the mesh numbers the training and the test
    batches in one count, so both splits have a multiple of k batches (and `data.limit`, when
    set, must be one too). The stream depends only on (seed, split, epoch); `shuffle` and
    `data_dir`, which every source takes, change nothing (the data is generated).
    """

    def __init__(self, split: str = "train", batch_size: int = 64, shuffle: bool = False,
                 seed: int = 0, data_dir: str | None = None, k: int = 4, batches: int = 400,
                 test_batches: int = 40, noise: float = 0.1):
        self.batches = batches if split == "train" else test_batches
        if self.batches % k:
            raise ValueError(f"two clocks: {self.batches} {split} batches is not a multiple of k={k}")
        self.k, self.batch_size, self.noise = k, batch_size, noise
        self.seed = seed if split == "train" else seed + 1_000_003
        self.num_classes = max(2, k + 1)
        self.epoch = 0

    def __len__(self) -> int:
        return self.batches

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (DIGITS,)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iterate(self.epoch)

    def iterate(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        rng = np.random.default_rng([self.seed, epoch])
        digits = rng.integers(DIGITS, size=(self.batches, self.batch_size))
        x = np.eye(DIGITS, dtype=np.float32)[digits]
        x += self.noise * rng.standard_normal(x.shape, dtype=np.float32)
        low = (digits < 5).reshape(-1, self.k, self.batch_size).cumsum(axis=1).reshape(digits.shape)
        y = np.stack([digits % 2, low], axis=-1).astype(np.int64)
        for i in range(self.batches):
            yield torch.from_numpy(x[i]), torch.from_numpy(y[i])


class ColumnClassification:
    """Cross entropy on one column of [B, columns] labels: each head reads its own task."""

    def __init__(self, column: int):
        self.column = column

    def loss(self, output: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(output, labels[:, self.column])

    def correct(self, output: Tensor, labels: Tensor) -> int:
        return int((output.argmax(dim=1) == labels[:, self.column]).sum())

    def scored(self, labels: Tensor) -> int:
        return len(labels)


class GroupReader(nn.Module):
    """Network B: flattens a stack of k messages [B, k, d_in] and classifies it with an MLP.

    detach=True cuts B's gradient to A (the no-gradient baseline): A is answered with zeros.
    """

    def __init__(self, d_in: int, k: int, hidden: int, classes: int, detach: bool = False):
        super().__init__()
        self.detach = detach
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(k * d_in, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.detach() if self.detach else x)
