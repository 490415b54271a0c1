import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dni_mesh.language_model import IGNORE
from nodes.mnist_files import DatasetError
from nodes.ptb import EOS, MD5, PennTreebank
from nodes.sequence_tasks import CopyTask

SHARED = Path(os.environ.get("DNI_MESH_DATA", "")) / "ptb"
have_ptb = pytest.mark.skipif(
    not os.environ.get("DNI_MESH_DATA") or not all((SHARED / name).exists() for name in MD5),
    reason="PTB not found: set DNI_MESH_DATA to a folder whose ptb/ holds Mikolov's 6 files")


def joined(source) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*source)
    return torch.cat(xs, dim=1), torch.cat(ys, dim=1)


@have_ptb
def test_rows_continue_across_chunks_and_targets_are_the_next_characters():
    source = PennTreebank("valid", batch_size=4, chunk=7, limit=1001)
    chunks = list(source)
    assert len(chunks) == len(source) == 250 // 7   # whole chunks only: one shape per edge
    assert all(chunk.shape == target.shape == (4, 7) for chunk, target in chunks)
    x, y = joined(chunks)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert (source.x[1:, 0] == source.y[:-1, -1]).all()   # row r+1 starts where row r's targets end
    assert x.dtype == torch.int64 and torch.equal(x, joined(source.iterate(5))[0])


@have_ptb
def test_character_and_word_levels_share_the_training_vocabulary():
    chars = PennTreebank("test", level="char", batch_size=2, chunk=5, limit=100)
    assert chars.num_classes == 50 and EOS in chars.vocab and "_" in chars.vocab
    assert "".join(chars.vocab[i] for i in chars.x[0, :12]) == "no_it_was_n'"
    words = PennTreebank("valid", level="word", batch_size=2, chunk=5, limit=100)
    assert words.num_classes == 10000 and "<unk>" in words.vocab


def test_a_missing_file_names_itself_and_where_to_put_it(tmp_path):
    with pytest.raises(DatasetError) as error:
        PennTreebank("train", data_dir=tmp_path)
    text = str(error.value)
    assert str(tmp_path / "ptb" / "ptb.char.train.txt") in text and "DNI_MESH_DATA" in text
    assert MD5["ptb.char.train.txt"] in text


def test_a_corrupt_file_fails_its_checksum(tmp_path, monkeypatch):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.train.txt").write_text(" the cat <unk> \n")
    monkeypatch.setenv("DNI_MESH_DATA", str(tmp_path))
    with pytest.raises(DatasetError, match=r"ptb\.train\.txt has md5 .* expected f26c4b92"):
        PennTreebank("train", level="word")


@have_ptb
def test_the_test_split_is_checked_too(tmp_path):
    (tmp_path / "ptb").mkdir()
    shutil.copy(SHARED / "ptb.char.train.txt", tmp_path / "ptb")
    (tmp_path / "ptb" / "ptb.char.test.txt").write_text("a b c\n")
    with pytest.raises(DatasetError, match="ptb.char.test.txt has md5"):
        PennTreebank("test", data_dir=tmp_path)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="level"):
        PennTreebank("train", level="byte")
    with pytest.raises(ValueError, match="split"):
        PennTreebank("dev")


@pytest.mark.parametrize("repeats", [1, 3])
def test_copy_targets_are_the_symbols_repeated_and_only_they_are_scored(repeats):
    task = CopyTask(length=4, repeats=repeats, batch_size=3, chunk=6, batches=20, seed=2)
    x, y = joined(task)
    episode = task.episode_length
    assert episode == 1 + 4 + 4 * repeats
    for row in range(3):
        starts = np.flatnonzero(x[row].numpy() == task.symbols + 1)
        for s in starts[1:]:
            if s + episode > x.shape[1]:
                break
            data = x[row, s + 1:s + 5]
            assert x[row, s + 5] == task.symbols + 1 + repeats
            assert torch.equal(y[row, s + 5:s + episode], data.repeat(repeats))
            assert torch.all(y[row, s:s + 5] == IGNORE)
            assert torch.all(x[row, s + 6:s + episode] == task.symbols)


def test_copy_streams_are_deterministic_and_the_vocabulary_fixed():
    a, b = CopyTask(length=3, seed=1), CopyTask(length=3, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(joined(a.iterate(2)), joined(b.iterate(2))))
    assert not torch.equal(joined(a.iterate(0))[0], joined(a.iterate(1))[0])
    assert CopyTask(length=9, repeats=5).num_classes == a.num_classes
    offsets = {int(np.flatnonzero(row == a.symbols + 1)[0]) for row in joined(a)[0].numpy()}
    assert len(offsets) > 1   # rows start at different phases of their episodes
