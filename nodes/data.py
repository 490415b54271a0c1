"""Data sources: iterables of (x float32, y int64) batches, shuffled deterministically.

Every source has the same interface: len() = batches per epoch, num_classes, sample_shape,
iterate(epoch) (or set_epoch(epoch) and plain iteration). The order of an epoch depends only on
(seed, epoch), so a mesh's source node and the single-process reference see the same batches.
Decoded arrays live in the source object; make one per process and reuse it.
"""
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from nodes.mnist_files import load_split

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class ArraySource:
    """Batches from in-memory arrays x (N, ...) and y (N,)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, num_classes: int, batch_size: int,
                 shuffle: bool, seed: int, limit: int | None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.x, self.y = x[:limit], y[:limit]
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iterate(self.epoch)

    def iterate(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.y)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.features(index), torch.from_numpy(self.y[index].astype(np.int64))

    def features(self, index: np.ndarray) -> Tensor:
        return torch.from_numpy(self.x[index])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.features(np.arange(1)).shape[1:])


class MNIST(ArraySource):
    """MNIST digits, normalised with the training set's mean and std.

    flatten=True gives (B, 784), else (B, 1, 28, 28). limit keeps the first `limit` samples.
    data_dir: see nodes.mnist_files (argument, else DNI_MESH_DATA, else ~/.cache/dni_mesh).
    """

    def __init__(self, split: str = "train", batch_size: int = 256, shuffle: bool = True,
                 seed: int = 0, data_dir: str | os.PathLike | None = None, flatten: bool = True,
                 limit: int | None = None, download: bool = True):
        images, labels = load_split(split, data_dir, download)
        super().__init__(images, labels, 10, batch_size, shuffle, seed, limit)
        self.flatten = flatten

    def features(self, index: np.ndarray) -> Tensor:
        x = self.x[index].astype(np.float32)   # numpy: no thread pool to wake per batch
        x /= 255
        x -= MNIST_MEAN
        x /= MNIST_STD
        return torch.from_numpy(x.reshape(len(index), -1) if self.flatten else x[:, None])


class Blobs(ArraySource):
    """Seeded Gaussian blobs: num_classes centres in dim dimensions, unit-variance noise.

    The centres depend on seed only, so "train" and "test" share them and differ in samples.
    """

    def __init__(self, split: str = "train", batch_size: int = 64, shuffle: bool = True,
                 seed: int = 0, num_samples: int = 512, dim: int = 16, num_classes: int = 4,
                 separation: float = 3.0, limit: int | None = None):
        if split not in ("train", "test"):
            raise ValueError(f"Blobs split {split!r}: expected 'train' or 'test'")
        centres = np.random.default_rng(seed).normal(size=(num_classes, dim)) * separation
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        y = rng.integers(num_classes, size=num_samples)
        x = (centres[y] + rng.normal(size=(num_samples, dim))).astype(np.float32)
        super().__init__(x, y, num_classes, batch_size, shuffle, seed, limit)
