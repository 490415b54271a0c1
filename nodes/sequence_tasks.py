"""Copy and repeat-copy (Graves et al. 2014; Jaderberg et al. 2016, section 3.2), as streams.

An episode shows START, then `length` random data symbols, then the repeat-count token R
(for the copy task R = 1, the "go" mark), then blanks; from the count token on, the targets
are the data symbols, R times over. Every other target is IGNORE: only the recall is scored.
Episodes follow each other with no break in every one of the batch_size rows, which are
streamed in chunks like a text (`nodes.ptb.ChunkedRows`), so a recurrent stage that carries
its state across chunks sees one endless stream; each row starts at a random phase of its
first episode, so chunk boundaries fall everywhere in an episode. The dependency spans
`length` steps for copy and length * repeats for repeat copy: a truncation T shorter than
that leaves BPTT blind to it.

The vocabulary is fixed by (symbols, max_repeats), not by the difficulty, so one model can
follow a curriculum; the streams depend only on (seed, epoch) and the settings.
"""
from __future__ import annotations

import numpy as np

from dni_mesh.language_model import IGNORE
from nodes.ptb import ChunkedRows


class CopyTask(ChunkedRows):
    """Copy (repeats=1) or repeat copy (repeats > 1) of `length` symbols, streamed in chunks.

    Tokens: 0..symbols-1 data, symbols = blank, symbols + 1 = START, symbols + 1 + r = the
    count r for r in 1..max_repeats. An epoch is `batches` chunks. The "test" split draws other
    sequences than "train" for the same seed; `shuffle` and `data_dir`, which every source
    takes, change nothing (the data is generated).
    """

    def __init__(self, length: int = 1, repeats: int = 1, symbols: int = 8,
                 max_repeats: int = 16, batch_size: int = 32, chunk: int = 8,
                 batches: int = 100, seed: int = 0, split: str = "train", shuffle: bool = False,
                 data_dir: str | None = None):
        if length < 1 or symbols < 2:
            raise ValueError(f"copy task: length {length} must be >= 1, symbols {symbols} >= 2")
        if not 1 <= repeats <= max_repeats:
            raise ValueError(f"copy task: repeats {repeats} must be in 1..{max_repeats}")
        super().__init__(symbols + 2 + max_repeats, batch_size, chunk, batches * chunk)
        self.length = length
        self.repeats = repeats
        self.symbols = symbols
        self.seed = seed if split == "train" else seed + 1_000_003

    @property
    def episode_length(self) -> int:
        return 1 + self.length + self.length * self.repeats

    def rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, self.length, self.repeats])
        n, r, e = self.length, self.repeats, self.episode_length
        episodes = -(-self.row_length // e) + 1
        data = rng.integers(self.symbols, size=(self.batch_size, episodes, n))
        x = np.full((self.batch_size, episodes, e), self.symbols, dtype=np.int64)
        y = np.full((self.batch_size, episodes, e), IGNORE, dtype=np.int64)
        x[:, :, 0] = self.symbols + 1
        x[:, :, 1:n + 1] = data
        x[:, :, n + 1] = self.symbols + 1 + r
        y[:, :, n + 1:] = np.tile(data, (1, 1, r))
        y[:, 0, :] = IGNORE   # a row may start inside its first episode, after the symbols
        offsets = rng.integers(e, size=self.batch_size)
        x, y = x.reshape(self.batch_size, -1), y.reshape(self.batch_size, -1)
        window = offsets[:, None] + np.arange(self.row_length)
        return np.take_along_axis(x, window, 1), np.take_along_axis(y, window, 1)
