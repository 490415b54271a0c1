"""Penn Treebank (Mikolov's language-modelling version), character or word level, streamed.

The split's token stream (each line's tokens, then "<eos>") is cut into batch_size rows; batch
i holds tokens [i*chunk, (i+1)*chunk) of every row, so every row continues the previous
batch's row. That is what a recurrent stage carrying its state across chunks needs, so the
order never changes with the epoch. Targets are the next tokens. The vocabulary is the
training split's, so every split shares it. Character-level files spell words with
space-separated characters and "_" between words.

Data directory: the argument, else env DNI_MESH_DATA, else ~/.cache/dni_mesh; the files sit in
its ptb/ subfolder and their md5s are checked. Nothing is downloaded: a missing or corrupt
file fails with the name of the file and where to put it.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nodes.mnist_files import ENV, DatasetError, data_root, md5

EOS = "<eos>"
MD5 = {
    "ptb.train.txt": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "ptb.valid.txt": "aa0affc06ff7c36e977d7cd49e3839bf",
    "ptb.test.txt": "8b80168b89c18661a38ef683c0dc3721",
    "ptb.char.train.txt": "874909f99060142f6b88cc74c34baaa2",
    "ptb.char.valid.txt": "9e0fe5bec2a8bf43fd686dc23d5ab8bb",
    "ptb.char.test.txt": "1f9a2d1afe00f76e8bfbe09a65439681",
}
SPLITS = ("train", "valid", "test")
LEVELS = {"char": "ptb.char.{split}.txt", "word": "ptb.{split}.txt"}


def file_name(level: str, split: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"PTB level {level!r}: expected one of {list(LEVELS)}")
    if split not in SPLITS:
        raise ValueError(f"PTB split {split!r}: expected one of {list(SPLITS)}")
    return LEVELS[level].format(split=split)


def checked(directory: Path, name: str) -> Path:
    """The path of a PTB file whose md5 is the published one; else a DatasetError that says
    which file to put where."""
    path = directory / name
    if not path.exists():
        raise DatasetError(
            f"Penn Treebank file missing: {path}. Put Mikolov's {name} (md5 {MD5[name]}, in "
            f"simple-examples.tgz as data/{name}) in {directory}, or set {ENV} to a folder "
            f"whose ptb/ subfolder holds it (or pass data_dir=...).")
    digest = md5(path)
    if digest != MD5[name]:
        raise DatasetError(f"{path} has md5 {digest}, expected {MD5[name]}: it is corrupt or not "
                           f"the original file. Replace it with Mikolov's {name}.")
    return path


def tokens_of(path: Path) -> list[str]:
    words = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words += line.split() + [EOS]
    return words


def load(level: str, split: str, data_dir: str | os.PathLike | None = None
         ) -> tuple[np.ndarray, list[str]]:
    """(token ids int64, vocabulary) of a split; ids index the training split's vocabulary."""
    directory = data_root(data_dir) / "ptb"
    name = file_name(level, split)
    train = tokens_of(checked(directory, file_name(level, "train")))
    vocab = sorted(set(train))
    words = train if split == "train" else tokens_of(checked(directory, name))
    index = {w: i for i, w in enumerate(vocab)}
    unknown = set(words) - index.keys()
    if unknown:
        raise DatasetError(f"{directory / name}: tokens outside the training "
                           f"vocabulary: {sorted(unknown)[:5]}")
    return np.fromiter((index[w] for w in words), dtype=np.int64, count=len(words)), vocab


class ChunkedRows:
    """Batch-major chunks of batch_size parallel token rows: x [B, chunk], targets [B, chunk].

    A subclass gives the rows of an epoch (`rows`); chunk i holds steps [i*chunk, (i+1)*chunk)
    of every row, so every row continues the previous chunk's row. Only whole chunks are
    streamed (a mesh's edges carry one shape): a remainder shorter than a chunk is left out.
    """

    def __init__(self, num_classes: int, batch_size: int, chunk: int, row_length: int):
        if batch_size < 1 or chunk < 1:
            raise ValueError(f"batch_size and chunk must be at least 1, got {batch_size}, {chunk}")
        if row_length < chunk:
            raise ValueError(f"{batch_size} rows of {row_length} tokens: not one chunk of "
                             f"{chunk} to stream")
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.chunk = chunk
        self.row_length = row_length
        self.epoch = 0

    def rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each int64 [batch_size, row_length]."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.row_length // self.chunk

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.chunk,)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iterate(self.epoch)

    def iterate(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self.rows(epoch)
        for start in range(0, len(self) * self.chunk, self.chunk):
            window = slice(start, start + self.chunk)
            yield torch.from_numpy(x[:, window].copy()), torch.from_numpy(y[:, window].copy())


class PennTreebank(ChunkedRows):
    """PTB of `level` "char" or "word", split "train", "valid" or "test", streamed in chunks.

    The rows are the same every epoch: they must continue across chunks, so `shuffle` and
    `seed` (which every source takes) change nothing. limit keeps the first `limit` tokens of
    the split (quick runs, partial evaluations).
    """

    def __init__(self, split: str = "train", level: str = "char", batch_size: int = 32,
                 chunk: int = 8, data_dir: str | os.PathLike | None = None,
                 limit: int | None = None, shuffle: bool = False, seed: int = 0):
        ids, self.vocab = load(level, split, data_dir)
        ids = ids[:limit]
        row = (len(ids) - 1) // batch_size
        super().__init__(len(self.vocab), batch_size, chunk, row)
        self.x = ids[:batch_size * row].reshape(batch_size, row)
        self.y = ids[1:batch_size * row + 1].reshape(batch_size, row)
        self.split = split
        self.level = level

    def rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x, self.y
