import functools
import gzip
import os
import shutil
import struct
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from nodes.data import MNIST, Blobs
from nodes.mnist_files import MD5, DatasetError, data_root, load_split, read_idx

torch.set_num_threads(1)

SHARED = Path(os.environ.get("DNI_MESH_DATA", "")) / "mnist"
have_mnist = pytest.mark.skipif(
    not os.environ.get("DNI_MESH_DATA") or not all((SHARED / name).exists() for name in MD5),
    reason="MNIST not found: set DNI_MESH_DATA to a folder whose mnist/ holds the 4 gz files")


@have_mnist
def test_mnist_train_and_test_splits():
    train = MNIST("train", shuffle=False)
    x, y = next(iter(train))
    assert x.shape == (256, 784) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert len(train) == 235 and train.num_classes == 10 and train.sample_shape == (784,)
    assert np.bincount(train.y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265,
                                             5851, 5949]
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2
    test = MNIST("test", batch_size=1000, flatten=False, limit=3000)
    assert len(test) == 3 and next(iter(test))[0].shape == (1000, 1, 28, 28)


@have_mnist
def test_mnist_shuffle_depends_on_seed_and_epoch_only():
    a, b = (MNIST("test", batch_size=64, seed=5, limit=2000) for _ in range(2))
    first = [y for _, y in a.iterate(0)]
    assert all(torch.equal(u, v) for u, v in zip(first, (y for _, y in b.iterate(0))))
    b.set_epoch(1)
    second = [y for _, y in b]
    assert not torch.equal(first[0], second[0])
    assert sorted(torch.cat(first).tolist()) == sorted(torch.cat(second).tolist())


def test_data_root_prefers_argument_then_environment_then_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DNI_MESH_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("DNI_MESH_DATA")
    assert data_root() == Path.home() / ".cache" / "dni_mesh"


def test_missing_files_error_says_what_to_put_where(tmp_path):
    with pytest.raises(DatasetError) as error:
        MNIST("train", data_dir=tmp_path, download=False)
    text = str(error.value)
    assert str(tmp_path / "mnist") in text and "DNI_MESH_DATA" in text
    for name, digest in MD5.items():
        assert name in text and digest in text


def test_failed_download_is_reported(tmp_path):
    with pytest.raises(DatasetError, match="Downloading them failed: http://127.0.0.1:9/"):
        load_split("test", tmp_path, mirrors=("http://127.0.0.1:9/",), timeout=2)
    assert not list((tmp_path / "mnist").glob("*.part"))


def test_checksum_mismatch_names_the_file(tmp_path):
    (tmp_path / "mnist").mkdir()
    for name in MD5:
        (tmp_path / "mnist" / name).write_bytes(b"not mnist")
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz has md5 \w+, expected "
                                           r"f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        load_split("train", tmp_path, download=False)


@pytest.fixture
def mirror(tmp_path):
    """A local HTTP server over a folder, standing in for a public mirror."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@have_mnist
def test_missing_files_are_downloaded_and_checked(tmp_path, mirror):
    folder, url = mirror
    (folder / "bad").mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(SHARED / name, folder / name)
        (folder / "bad" / name).write_bytes(b"tampered")
    images, labels = load_split("test", tmp_path / "data", mirrors=(url + "bad/", url), timeout=5)
    assert images.shape == (10000, 28, 28) and labels[:3].tolist() == [7, 2, 1]
    assert not list((tmp_path / "data" / "mnist").glob("*.part"))


def write_idx(path: Path, header: bytes, body: bytes) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(header + body)
    return path


@pytest.mark.parametrize("header,body,problem", [
    (b"\0\0\x09\x01" + struct.pack(">I", 3), bytes(3), "bad idx header"),
    (b"\0\0\x08\x02" + struct.pack(">2I", 3, 1), bytes(3), "bad idx header"),
    (b"\0\0\x08\x01" + struct.pack(">I", 4), bytes(3), "3 data bytes, header says 4"),
    (b"\0\0\x08", b"", "bad idx header"),
])
def test_idx_reader_is_strict(tmp_path, header, body, problem):
    with pytest.raises(DatasetError, match=problem):
        read_idx(write_idx(tmp_path / "x.gz", header, body), ())


def test_idx_reader_checks_item_shape_and_gzip(tmp_path):
    path = write_idx(tmp_path / "x.gz", b"\0\0\x08\x03" + struct.pack(">3I", 2, 2, 3), bytes(12))
    assert read_idx(path, (2, 3)).shape == (2, 2, 3)
    with pytest.raises(DatasetError, match=r"items of shape \(2, 3\), expected \(28, 28\)"):
        read_idx(path, (28, 28))
    (tmp_path / "raw").write_bytes(b"plain bytes")
    with pytest.raises(DatasetError, match="not a readable gzip"):
        read_idx(tmp_path / "raw", ())


def test_blobs_are_deterministic_and_shuffled_per_epoch():
    a, b = Blobs(seed=2), Blobs(seed=2)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert len(a) == 8 and a.sample_shape == (16,) and a.num_classes == 4
    epoch0 = list(a.iterate(0))
    assert all(torch.equal(x, u) for (x, _), (u, _) in zip(epoch0, b.iterate(0)))
    epoch1 = list(a.iterate(1))
    assert not torch.equal(epoch0[0][0], epoch1[0][0])
    assert not np.array_equal(Blobs(seed=3).x, a.x)
    test = Blobs("test", seed=2)
    assert not np.array_equal(test.x, a.x)
    unshuffled = Blobs(seed=2, shuffle=False, batch_size=500)
    assert [len(y) for _, y in unshuffled] == [500, 12]
    assert torch.equal(next(iter(unshuffled))[1], torch.from_numpy(a.y[:500]))
