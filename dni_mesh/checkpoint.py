"""One node's checkpoint on disk: written atomically, checked before it is parsed, never unpickled.

A node that dies is restarted from its own checkpoint while its peers keep learning, so a
checkpoint must survive the very crash it is for: a file is written in full under a temporary
name, flushed to disk, then renamed over `NODE.ckpt`; the one it replaces is kept as
`NODE.prev.ckpt`, so a newest file that turns out bad still leaves a good one to resume from.

The format is a 28-byte header (`MAGIC`, `VERSION` as uint32, the seq as int64 and the payload
length as uint64, little-endian), the payload (`torch.save` of a dict of tensors, numbers,
strings, lists and dicts) and the sha256 of header and payload. The length and the digest are
checked before `torch.load(weights_only=True)` sees a byte, so a truncated or overwritten file is
named as such rather than failing somewhere inside the unpickler, and even a file whose digest
matches cannot make the loader build an arbitrary object.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

MAGIC = b"DNICKPT\n"
VERSION = 1
HEADER = struct.Struct("<8sIqQ")  # magic, version, seq, payload length
DIGEST_SIZE = hashlib.sha256().digest_size

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted: the message names the file and what is wrong."""


@dataclass(frozen=True)
class Checkpoint:
    state: dict   # what the node saved: stage, core and data position
    seq: int      # the seq it resumes at: it was saved before taking it
    path: Path    # the file it was read from


@dataclass(frozen=True)
class CheckpointPolicy:
    """When a node saves, counted in seqs (the source's batches, evaluation included). A restart
    loses the steps since the last save, and each save costs a write of the whole state, so
    `every` trades the one against the other (0: never by count). After an evaluation pass a
    resume does not repeat it."""
    every: int = 200
    at_evaluation: bool = True

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"checkpoint every {self.every} seqs: must be 0 (never) or more")

    def due(self, seq: int, evaluation: bool = False) -> bool:
        """Whether to save before `seq`, or at the end of an evaluation (evaluation=True)."""
        if evaluation:
            return self.at_evaluation
        return self.every > 0 and seq > 0 and seq % self.every == 0


def save_checkpoint(folder: Path, node: str, state: dict, seq: int) -> Path:
    """Write node's checkpoint atomically and return its path. The state is read back through
    `torch.load(weights_only=True)` first: one the loader would refuse must not replace a good
    one."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    _unpickle(payload, f"the state of node {node} before seq {seq}")
    header = HEADER.pack(MAGIC, VERSION, seq, len(payload))
    digest = hashlib.sha256(header)
    digest.update(payload)
    newest, previous, temporary = _paths(folder, node)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with open(temporary, "wb") as file:
            file.write(header)
            file.write(payload)
            file.write(digest.digest())
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if newest.exists():
        os.replace(newest, previous)
    os.replace(temporary, newest)
    directory = os.open(folder, os.O_RDONLY)  # make the renames themselves durable
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return newest


def load_checkpoint(folder: Path, node: str, seq: int | None = None) -> Checkpoint | None:
    """The newest good checkpoint of node (or the one saved before `seq`); None if it has
    none. A bad newest one is passed over with a warning for the previous; if no file there is
    good (and at seq), CheckpointError names each and what is wrong with it."""
    problems: list[str] = []
    for path in _paths(folder, node)[:2]:
        try:
            checkpoint = _read(path)
        except FileNotFoundError:
            continue
        except CheckpointError as error:
            problems.append(str(error))
            continue
        if seq is not None and checkpoint.seq != seq:
            problems.append(f"{path} was saved before seq {checkpoint.seq}, not {seq}")
            continue
        if problems:
            log.warning("node %s: %s; resuming from %s (seq %d) instead", node, problems[0],
                        path, checkpoint.seq)
        return checkpoint
    if problems:
        raise CheckpointError(f"node {node}: no usable checkpoint: " + "; ".join(problems))
    if seq is not None:
        raise CheckpointError(f"node {node}: no checkpoint in {folder} to resume at seq {seq}")
    return None


def saved_seqs(folder: Path, node: str) -> list[int]:
    """The seqs node's good checkpoints resume at, newest first: from the headers of files
    whose digest matches (their payload is not unpickled)."""
    seqs = []
    for path in _paths(folder, node)[:2]:
        try:
            seqs.append(_checked(path)[1])
        except (FileNotFoundError, CheckpointError):
            continue
    return seqs


def _paths(folder: Path, node: str) -> tuple[Path, Path, Path]:
    """Newest, previous and the temporary file a save writes before renaming it."""
    return folder / f"{node}.ckpt", folder / f"{node}.prev.ckpt", folder / f"{node}.ckpt.tmp"


def _read(path: Path) -> Checkpoint:
    """Check a file's framing and digest, then unpickle its payload with weights_only."""
    data, seq, end = _checked(path)
    return Checkpoint(_unpickle(data[HEADER.size:end], str(path)), seq, path)


def _checked(path: Path) -> tuple[memoryview, int, int]:
    """A file's bytes, its seq and where its payload ends, once its framing and digest hold."""
    data = memoryview(path.read_bytes())
    if data[:len(MAGIC)] != MAGIC:
        if MAGIC.startswith(data):
            raise CheckpointError(f"{path}: truncated ({len(data)} bytes)")
        raise CheckpointError(f"{path}: not a dni_mesh checkpoint (it does not start with {MAGIC!r})")
    if len(data) < HEADER.size:
        raise CheckpointError(f"{path}: truncated ({len(data)} bytes, the header alone is {HEADER.size})")
    _, version, seq, length = HEADER.unpack_from(data)
    if version != VERSION:
        raise CheckpointError(f"{path}: wrong version {version} (this dni_mesh reads {VERSION})")
    end = HEADER.size + length
    if len(data) != end + DIGEST_SIZE:
        what = "truncated" if len(data) < end + DIGEST_SIZE else "corrupt"
        raise CheckpointError(f"{path}: {what} ({len(data)} bytes where its header says "
                              f"{end + DIGEST_SIZE})")
    if hashlib.sha256(data[:end]).digest() != data[end:]:
        raise CheckpointError(f"{path}: bad checksum (the sha256 of its contents does not match)")
    return data, seq, end


def _unpickle(payload: memoryview, what: str) -> dict:
    """torch.load with weights_only: tensors, numbers, strings and containers, nothing else."""
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{what}: refused by torch.load(weights_only=True): "
                              f"{type(error).__name__}: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{what}: holds a {type(state).__name__}, not a dict")
    return state
