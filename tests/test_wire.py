"""Codec behaviour: round trips, zero-copy, bit exactness, golden vectors, construction checks."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from dni_mesh import wire

PROTOCOLS = Path(__file__).resolve().parents[1] / "protocols"
VALID = sorted((PROTOCOLS / "vectors").glob("*.json"))
INVALID = sorted((PROTOCOLS / "vectors" / "invalid").glob("*.json"))


def words(t: torch.Tensor) -> bytes:
    """Exact bytes of a tensor: compares NaN payloads and -0.0 too."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def roundtrip(msg: wire.Message) -> wire.Message:
    return wire.decode(wire.encode(msg))


def address(buffer: object) -> int:
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    values = torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(shape) * 7.25 - 11
    return values % 2 > 0.5 if dtype == torch.bool else values.to(dtype)


@pytest.mark.parametrize("dtype", list(wire.DTYPES.values()), ids=list(wire.DTYPES))
@pytest.mark.parametrize("shape", [(3, 4), (0,), (2, 0, 3), (), (1, 1, 1, 1, 1, 1, 1, 5)])
def test_every_dtype_and_shape_round_trips(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    h = sample(dtype, shape)
    out = roundtrip(wire.Activation("a->b", 5, h, torch.tensor([1, 2]), "eval"))
    assert (out.edge, out.seq, out.phase) == ("a->b", 5, "eval")
    assert out.h.dtype == dtype and out.h.shape == h.shape and words(out.h) == words(h)
    assert out.labels is not None and out.labels.tolist() == [1, 2]


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.t(),
        lambda t: t[::2, 1:],
        lambda t: t[:, 3],
        lambda t: t[1:2].expand(5, 6),  # stride 0
        lambda t: t.reshape(1, 6, 6, 1).permute(0, 2, 1, 3),
    ],
    ids=["transposed", "step-sliced", "column", "expanded", "permuted"],
)
def test_non_contiguous_tensors_are_sent_in_row_major_order(make) -> None:
    h = make(torch.arange(36.0).reshape(6, 6))
    frames = wire.encode(wire.Gradient("e", 1, h))
    assert bytes(frames[1]) == words(h.contiguous())
    assert torch.equal(wire.decode(frames).dh, h)


def test_large_contiguous_tensor_is_encoded_and_decoded_without_copies() -> None:
    h = torch.randn(4, 1 << 20)  # 16 MB
    frames = wire.encode(wire.Activation("e", 0, h))
    assert address(frames[1]) == h.data_ptr()  # encode: a view of the tensor's storage
    received = torch.empty(h.numel() * 4, dtype=torch.uint8)  # aligned, writable, like a zmq frame
    received.copy_(h.reshape(-1).view(torch.uint8))
    out = wire.decode([frames[0], memoryview(received.numpy())])
    assert out.h.data_ptr() == received.data_ptr()  # decode: a view of the frame
    assert torch.equal(out.h, h)


def test_contiguous_slice_is_sent_from_its_offset_without_copy() -> None:
    base = torch.arange(100, dtype=torch.int32)
    frames = wire.encode(wire.Activation("e", 0, base[10:20]))
    assert address(frames[1]) == base[10:].data_ptr()
    assert wire.decode(frames).h.tolist() == list(range(10, 20))


def test_misaligned_frame_gives_an_aligned_correct_copy() -> None:
    h = torch.randn(1000, dtype=torch.float64)
    header, _ = wire.encode(wire.Activation("e", 0, h))
    storage = np.zeros(8001 + 64, dtype=np.uint8)
    start = (-storage.ctypes.data) % 64 + 1  # one byte past a 64-byte boundary
    storage[start : start + 8000] = np.frombuffer(words(h), dtype=np.uint8)
    out = wire.decode([header, memoryview(storage)[start : start + 8000]])
    assert out.h.data_ptr() % 8 == 0 and out.h.data_ptr() != storage.ctypes.data + start
    assert torch.equal(out.h, h)


def test_read_only_frames_are_copied_quietly_and_stay_unchanged() -> None:
    frames = [bytes(f) for f in wire.encode(wire.Activation("e", 0, torch.ones(64)))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = wire.decode(frames)
    out.h.add_(1)  # received tensors are ordinary writable tensors
    assert out.h[0].item() == 2 and frames[1] == words(torch.ones(64))


def test_zmq_frames_decode_in_place() -> None:
    h = torch.randn(1 << 18)  # 1 MB, past pyzmq's copy threshold
    with zmq.Context() as ctx, ctx.socket(zmq.PAIR) as a, ctx.socket(zmq.PAIR) as b:
        a.bind("inproc://wire-test")
        b.connect("inproc://wire-test")
        a.send_multipart(wire.encode(wire.Gradient("e", 3, h)), copy=False)
        frames = b.recv_multipart(copy=False)
        out = wire.decode([frame.buffer for frame in frames])
        assert out.dh.data_ptr() == address(frames[1].buffer)
        del frames  # the tensor keeps the received frame alive
        gc.collect()
        assert torch.equal(out.dh, h)
        a.setsockopt(zmq.LINGER, 0)
        b.setsockopt(zmq.LINGER, 0)


def test_small_tcp_frames_at_odd_offsets_decode_to_aligned_copies() -> None:
    # libzmq receives small messages into one buffer, so a tensor frame can start at any offset.
    h = torch.arange(512, dtype=torch.float64)
    with zmq.Context() as ctx, ctx.socket(zmq.PAIR) as a, ctx.socket(zmq.PAIR) as b:
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        for edge in ("e", "ee", "eee", "eeee"):  # shifts the tensor frame's offset
            a.send_multipart(wire.encode(wire.Activation(edge, 0, h)), copy=False)
            out = wire.decode([frame.buffer for frame in b.recv_multipart(copy=False)])
            assert out.h.data_ptr() % 8 == 0 and torch.equal(out.h, h)
        a.setsockopt(zmq.LINGER, 0)
        b.setsockopt(zmq.LINGER, 0)


def test_every_bfloat16_bit_pattern_survives() -> None:
    patterns = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)
    out = roundtrip(wire.Gradient("e", 0, patterns)).dh
    assert out.dtype == torch.bfloat16 and words(out) == words(patterns)


def test_tensor_requiring_grad_is_sent_detached() -> None:
    h = torch.ones(3, requires_grad=True) * 2
    out = roundtrip(wire.Activation("e", 0, h))
    assert not out.h.requires_grad and out.h.tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    "msg",
    [
        wire.Hello("n", 1, "host", "tcp://127.0.0.1:5555"),
        wire.Ready("n"),
        wire.Heartbeat("n", 2**63 - 1, -0.5),
        wire.Metrics("n", 0, {"loss": float("inf"), "n": -(2**63), "tag": "é", "empty": ""}),
        wire.Metrics("n", 0, {}),
        wire.Stop("", ""),
        wire.End("e", 0),
        wire.EndAck("e", 10),
        wire.Error("n", "x" * 10_000),
    ],
    ids=lambda m: m.KIND,
)
def test_control_messages_round_trip_equal(msg: wire.Message) -> None:
    assert roundtrip(msg) == msg


def test_credit_only_gradient() -> None:
    out = roundtrip(wire.Gradient("e", 4))
    assert isinstance(out, wire.Gradient) and out.dh is None and len(wire.encode(out)) == 1


def test_header_bytes_are_deterministic() -> None:
    a = wire.encode(wire.Activation("e", 9, torch.zeros(2), torch.tensor([1, 2])))
    b = wire.encode(wire.Activation("e", 9, torch.zeros(2), labels=torch.tensor([1, 2]), phase="train"))
    assert bytes(a[0]) == bytes(b[0])


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_golden_vector_decodes_and_re_encodes_byte_for_byte(path: Path) -> None:
    vector = json.loads(path.read_text(encoding="utf-8"))
    frames = [bytes.fromhex(f) for f in vector["frames"]]
    msg = wire.decode(frames)
    assert msg.KIND == vector["header"]["kind"]
    for name, value in vector["header"].items():
        if name not in ("v", "kind", "tensors"):
            assert getattr(msg, name) == value
    for name, values in vector.get("values", {}).items():
        assert getattr(msg, name).tolist() == values
    assert [bytes(f) for f in wire.encode(msg)] == frames


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_vector_is_rejected_naming_the_field(path: Path) -> None:
    vector = json.loads(path.read_text(encoding="utf-8"))
    with pytest.raises(wire.WireError) as caught:
        wire.decode([bytes.fromhex(f) for f in vector["frames"]])
    assert str(caught.value).startswith(vector["error"] + ":")


def test_vectors_cover_every_kind_and_dtype() -> None:
    headers = [json.loads(p.read_text(encoding="utf-8"))["header"] for p in VALID]
    assert {h["kind"] for h in headers} == set(wire.KINDS)
    assert {t["dtype"] for h in headers for t in h["tensors"]} == set(wire.DTYPES)


def test_vectors_are_up_to_date_and_deterministic() -> None:
    spec = importlib.util.spec_from_file_location("make_vectors", PROTOCOLS / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.build()
    assert built == module.build()
    on_disk = {str(p.relative_to(PROTOCOLS / "vectors")): p.read_text(encoding="utf-8") for p in VALID + INVALID}
    assert built == on_disk


@pytest.mark.parametrize(
    "make, where",
    [
        (lambda: wire.Activation("e", -1, torch.zeros(1)), "act.seq"),
        (lambda: wire.Activation("e", 1, torch.zeros(1), phase="test"), "act.phase"),
        (lambda: wire.Activation("e", 1, torch.zeros(1), torch.zeros(1)), "act.labels"),
        (lambda: wire.Activation("e", 1, np.zeros(1)), "act.h"),
        (lambda: wire.Activation("e", 1, None), "act.tensors"),
        (lambda: wire.Activation("e", 1, torch.zeros(1, dtype=torch.complex64)), "act.h"),
        (lambda: wire.Activation("e", 1, torch.zeros(2, 2).to_sparse()), "act.h"),
        (lambda: wire.Gradient(b"e", 1), "grad.edge"),
        (lambda: wire.Heartbeat("n", True, 1.0), "heartbeat.step"),
        (lambda: wire.Heartbeat("n", 1, 1), "heartbeat.time"),
        (lambda: wire.Hello("n", 2**63, "h", "a"), "hello.pid"),
        (lambda: wire.Metrics("n", 1, {"ok": True}), "metrics.values"),
        (lambda: wire.Metrics("n", 1, {1: 1.0}), "metrics.values"),
        (lambda: wire.Metrics("n", 1, {"big": 2**63}), "metrics.values"),
    ],
)
def test_invalid_messages_cannot_be_built(make, where: str) -> None:
    with pytest.raises(wire.WireError, match=f"^{re.escape(where)}:"):
        make()


def test_error_texts_are_short_whatever_the_value() -> None:
    deep: list = []
    for _ in range(100_000):  # far past the interpreter's recursion limit
        deep = [deep]
    for value in (deep, "x" * 1_000_000, list(range(100_000)), {str(i): i for i in range(1000)}):
        with pytest.raises(wire.WireError, match="^end.seq:") as caught:
            wire.End("e", value)  # type: ignore[arg-type]
        assert len(str(caught.value)) < 200


def test_every_field_is_a_header_scalar_or_a_declared_tensor() -> None:
    for cls in wire.KINDS.values():
        scalars = [name for name, _ in cls.FIELDS]
        assert [f.name for f in dataclasses.fields(cls) if f.name not in scalars] == list(cls.TENSORS)
        assert all(name in cls.TENSORS for layout in cls.LAYOUTS for name in layout)
        assert list(cls.HEADER_KEYS) == ["v", "kind", *scalars, "tensors"]


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(TypeError):
        wire.encode({"kind": "end"})  # type: ignore[arg-type]


def test_limits_are_the_receivers_choice() -> None:
    frames = wire.encode(wire.Activation("e", 0, torch.zeros(256), torch.zeros(256, dtype=torch.int64)))
    wire.decode(frames)
    for limits, where in [
        (wire.Limits(max_tensor_bytes=1023), "act.tensors[0].nbytes"),
        (wire.Limits(max_message_bytes=2047), "act.tensors"),
        (wire.Limits(max_dims=0), "act.tensors[0].shape"),
        (wire.Limits(max_tensors=1), "frames"),
        (wire.Limits(max_header_bytes=50), "header"),
        (wire.Limits(max_depth=3), "header"),  # header, tensors, descriptor, shape: 4 levels
    ]:
        with pytest.raises(wire.WireError, match=f"^{re.escape(where)}:"):
            wire.decode(frames, limits)
