import ast
import errno
import hashlib
import io
import logging
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from test_stage import make_stage, train_chain

from dni_mesh import checkpoint
from dni_mesh.checkpoint import (HEADER, MAGIC, VERSION, CheckpointError, CheckpointPolicy,
                                 load_checkpoint, save_checkpoint)

PACKAGE = Path(checkpoint.__file__).parent


def node_state() -> dict:
    """What a node saves: a trained DNI stage, its core's position and its data position."""
    stage, head = make_stage("cdni", hidden=1), make_stage(module=torch.nn.Linear(6, 3), head=True)
    train_chain([stage, head], steps=3)
    core = {"counters": {"steps": 3, "evals": 1}, "sent": 3, "next_seq": 3, "accepted": {"src": 3}}
    data = {"epoch": 0, "index": 24, "rng": torch.Generator().manual_seed(3).get_state(),
            "shuffle": torch.randperm(10, dtype=torch.int64), "lr": 0.01, "name": "mnist", "last": True}
    return {"stage": stage.state_dict(), "core": core, "data": data}


def assert_identical(a, b, where="state") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, (dict, list, tuple)):
        assert len(a) == len(b), where
        pairs = ((k, a[k], b[k]) for k in a) if isinstance(a, dict) else zip(range(len(a)), a, b)
        for key, x, y in pairs:
            assert_identical(x, y, f"{where}[{key!r}]")
    else:
        assert a == b, where


def frame(payload: bytes, seq: int, version: int = VERSION) -> bytes:
    """A checkpoint file written by hand from the documented format."""
    header = HEADER.pack(MAGIC, version, seq, len(payload))
    return header + payload + hashlib.sha256(header + payload).digest()


def test_a_node_state_round_trips_bit_identically(tmp_path):
    state = node_state()
    path = save_checkpoint(tmp_path, "c1", state, seq=3)
    loaded = load_checkpoint(tmp_path, "c1")
    assert (loaded.path, loaded.seq) == (path, 3) and path.name == "c1.ckpt"
    assert_identical(state, loaded.state)
    restored = make_stage("cdni", hidden=1, seed=99)
    restored.load_state_dict(loaded.state["stage"])
    assert all(torch.equal(a, b) for a, b in zip(state["stage"]["module"].values(),
                                                  restored.module.state_dict().values(), strict=True))
    assert load_checkpoint(tmp_path, "c2") is None


def test_a_write_that_fails_halfway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    state = node_state()
    good = save_checkpoint(tmp_path, "c1", state, seq=1)
    room = good.stat().st_size // 2

    class FullDisk(io.FileIO):
        def write(self, data) -> int:
            nonlocal room
            written = super().write(bytes(data)[:room])
            room -= written
            if written < len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return written

    monkeypatch.setattr(checkpoint, "open", lambda path, mode: FullDisk(path, "w"), raising=False)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, "c1", state, seq=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1.ckpt"]  # no partial file left anywhere
    assert load_checkpoint(tmp_path, "c1").seq == 1


DAMAGE = {
    "empty": (lambda data: b"", "truncated"),
    "truncated": (lambda data: data[:len(data) // 2], "truncated"),
    "garbage": (lambda data: b"\x80\x02garbage" * 64, "not a dni_mesh checkpoint"),
    "flipped": (lambda data: data[:99] + bytes([data[99] ^ 1]) + data[100:], "bad checksum"),
    "trailing": (lambda data: data + b"\0", "corrupt"),
    "version": (lambda data: frame(data[HEADER.size:-32], 2, VERSION + 1), "wrong version 2"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_bad_newest_checkpoint_falls_back_to_the_previous_then_is_named(tmp_path, caplog, damage):
    spoil, reason = DAMAGE[damage]
    state = node_state()
    save_checkpoint(tmp_path, "c1", state, seq=1)
    newest = save_checkpoint(tmp_path, "c1", state, seq=2)
    newest.write_bytes(spoil(newest.read_bytes()))
    with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
        loaded = load_checkpoint(tmp_path, "c1")
    assert loaded.seq == 1 and loaded.path == tmp_path / "c1.prev.ckpt"
    assert f"{newest}: {reason}" in caplog.text
    assert_identical(state, loaded.state)
    previous = tmp_path / "c1.prev.ckpt"
    previous.write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path, "c1")
    assert f"{newest}: {reason}" in str(error.value)
    assert f"{previous}: not a dni_mesh checkpoint" in str(error.value)


def test_a_missing_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    """A crash between the two renames of a save leaves only the previous file."""
    save_checkpoint(tmp_path, "c1", {"w": torch.ones(2)}, seq=1)
    save_checkpoint(tmp_path, "c1", {"w": torch.zeros(2)}, seq=2).unlink()
    assert load_checkpoint(tmp_path, "c1").seq == 1


def test_a_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    buffer = io.BytesIO()
    torch.save({"module": Exploit()}, buffer)
    payload = buffer.getvalue()
    newest = save_checkpoint(tmp_path, "c1", {"w": torch.ones(2)}, seq=1)
    with pytest.raises(CheckpointError, match=re.escape("refused by torch.load(weights_only=True)")):
        save_checkpoint(tmp_path, "c1", {"module": Exploit()}, seq=2)
    assert load_checkpoint(tmp_path, "c1").seq == 1  # the refused state replaced nothing
    for content, reason in ((payload, "not a dni_mesh checkpoint"),
                            (frame(payload, 3), "refused by torch.load(weights_only=True)")):
        for seq in (1, 2):
            save_checkpoint(tmp_path, "c1", {"w": torch.ones(2)}, seq)
        newest.write_bytes(content)
        assert load_checkpoint(tmp_path, "c1").seq == 1
        (tmp_path / "c1.prev.ckpt").write_bytes(content)
        with pytest.raises(CheckpointError, match=re.escape(f"{newest}: {reason}")):
            load_checkpoint(tmp_path, "c1")
    assert not marker.exists()
    torch.load(io.BytesIO(payload), weights_only=False)  # the payload is live: unpickled, it runs
    assert marker.exists()


def test_the_policy_saves_every_n_seqs_and_at_evaluations():
    assert [s for s in range(10) if CheckpointPolicy(every=3).due(s)] == [3, 6, 9]
    assert CheckpointPolicy(every=3).due(4, evaluation=True)
    assert not CheckpointPolicy(every=3, at_evaluation=False).due(4, evaluation=True)
    assert not any(CheckpointPolicy(every=0).due(s) for s in range(10))
    with pytest.raises(ValueError, match="every -1 seqs"):
        CheckpointPolicy(every=-1)


def test_no_code_in_the_package_unpickles_without_weights_only():
    """torch.load only with weights_only=True; pickle's loaders not at all."""
    loads, unsafe = 0, []
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and call.func.attr in ("load", "loads", "Unpickler")):
                continue
            name = ast.unparse(call.func)
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                       and k.value.value is True for k in call.keywords)
            loads += name == "torch.load"
            if (name == "torch.load" and not safe) or name in ("pickle.load", "pickle.loads",
                                                               "pickle.Unpickler"):
                unsafe.append(f"{path.relative_to(PACKAGE.parent)}:{call.lineno}: {name}")
    assert loads >= 2 and not unsafe, unsafe
