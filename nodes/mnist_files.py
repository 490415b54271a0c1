"""The four original MNIST files: where they live, checking, fetching and parsing them.

Data directory: the argument, else env DNI_MESH_DATA, else ~/.cache/dni_mesh; the files sit in
its mnist/ subfolder. Every file's md5 is checked against the published one. A missing file is
downloaded from a public mirror of the originals when there is internet; when there is not,
the error says exactly which files to put where.
"""
import gzip
import hashlib
import os
import struct
import urllib.request
from math import prod
from pathlib import Path

import numpy as np

MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/")
ENV = "DNI_MESH_DATA"


class DatasetError(RuntimeError):
    """A data file is missing, corrupt or malformed; the text says which and what to do."""


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return Path.home() / ".cache" / "dni_mesh"


def load_split(split: str, data_dir: str | os.PathLike | None = None, download: bool = True,
               mirrors: tuple[str, ...] = MIRRORS, timeout: float = 30.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of "train" or "test", checked."""
    if split not in SPLITS:
        raise ValueError(f"MNIST split {split!r}: expected 'train' or 'test'")
    directory = data_root(data_dir) / "mnist"
    image_file, label_file = SPLITS[split]
    ensure_files(directory, SPLITS[split], download, mirrors, timeout)
    images = read_idx(directory / image_file, (28, 28))
    labels = read_idx(directory / label_file, ())
    if len(images) != len(labels):
        raise DatasetError(f"{directory}: {len(images)} images but {len(labels)} labels")
    if labels.max(initial=0) > 9:
        raise DatasetError(f"{directory / label_file}: label {labels.max()} is not a digit")
    return images, labels


def ensure_files(directory: Path, names: tuple[str, ...], download: bool,
                 mirrors: tuple[str, ...], timeout: float) -> None:
    missing = [name for name in names if not (directory / name).exists()]
    failures = [fetch(directory, name, mirrors, timeout) for name in missing] if download else []
    missing = [name for name in missing if not (directory / name).exists()]
    if missing:
        raise DatasetError(missing_message(directory, missing, [f for f in failures if f]))
    for name in names:
        digest = md5(directory / name)
        if digest != MD5[name]:
            raise DatasetError(
                f"{directory / name} has md5 {digest}, expected {MD5[name]}: it is corrupt or "
                f"not the original file. Delete it (it is downloaded again where there is "
                f"internet) or replace it with the original.")


def missing_message(directory: Path, missing: list[str], failures: list[str]) -> str:
    lines = [f"MNIST files missing from {directory}: {', '.join(missing)}."]
    if failures:
        lines.append("Downloading them failed: " + " | ".join(failures))
    lines.append(f"Put the four original gzip files in {directory}:")
    lines += [f"  {name}  (md5 {digest})" for name, digest in MD5.items()]
    lines.append(f"or set {ENV} to a folder whose mnist/ subfolder holds them "
                 f"(or pass data_dir=...).")
    return "\n".join(lines)


def fetch(directory: Path, name: str, mirrors: tuple[str, ...], timeout: float) -> str | None:
    """Download name from the first mirror that works; None on success, else why not."""
    errors = []
    directory.mkdir(parents=True, exist_ok=True)
    part = directory / (name + ".part")
    for mirror in mirrors:
        try:
            with urllib.request.urlopen(mirror + name, timeout=timeout) as response:
                part.write_bytes(response.read())
        except OSError as error:  # URLError, HTTPError and timeouts are all OSErrors
            errors.append(f"{mirror}{name}: {error}")
            continue
        if md5(part) == MD5[name]:
            part.replace(directory / name)
            return None
        errors.append(f"{mirror}{name}: wrong md5")
    part.unlink(missing_ok=True)
    return "; ".join(errors)


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_idx(path: Path, item_shape: tuple[int, ...]) -> np.ndarray:
    """Parse a gzipped idx file of unsigned bytes whose items have item_shape.

    Header: two zero bytes, type code 0x08 (ubyte), the number of dimensions, then one
    big-endian uint32 per dimension; the body must be exactly prod(dims) bytes.
    """
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise DatasetError(f"{path}: not a readable gzip file ({error})") from error
    ndim = 1 + len(item_shape)
    header = 4 + 4 * ndim
    if len(data) < header or data[:2] != b"\0\0" or data[2] != 0x08 or data[3] != ndim:
        raise DatasetError(f"{path}: bad idx header {data[:4].hex()}, expected "
                           f"0000 08 {ndim:02x} (unsigned bytes, {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if shape[1:] != item_shape:
        raise DatasetError(f"{path}: items of shape {shape[1:]}, expected {item_shape}")
    if len(data) - header != prod(shape):
        raise DatasetError(f"{path}: {len(data) - header} data bytes, header says {prod(shape)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
