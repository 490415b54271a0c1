"""Hostile input: whatever bytes arrive, decode raises WireError (or returns a valid message),
never another exception, and never allocates what a header merely claims."""

from __future__ import annotations

import re
import time
import tracemalloc
from collections.abc import Callable

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dni_mesh import wire

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any msgpack value, for putting the wrong thing in a field.
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=8,
)

MESSAGES = [
    wire.Activation("a->b", 3, torch.arange(6.0).reshape(2, 3), torch.tensor([0, 1])),
    wire.Gradient("a->b", 3, torch.ones(2, 3, dtype=torch.bfloat16)),
    wire.Gradient("a->b", 4),
    wire.Hello("n", 1, "h", "tcp://127.0.0.1:1"),
    wire.Heartbeat("n", 7, 1.5),
    wire.Metrics("n", 7, {"loss": 0.5}),
    wire.End("a->b", 9),
]
valid_frames = st.sampled_from([[bytes(f) for f in wire.encode(m)] for m in MESSAGES])
PACKER = msgpack.Packer()
END = {"v": 1, "kind": "end", "edge": "e", "seq": 1, "tensors": []}
DEEP = re.escape(f"header: nested deeper than {wire.DEFAULT_LIMITS.max_depth} levels")


def outcome(frames: list) -> wire.Message | None:
    """decode's result, or None for WireError; any other exception fails the test."""
    try:
        return wire.decode(frames)
    except wire.WireError:
        return None


def repack(frames: list[bytes], change: Callable[[dict], None]) -> list[bytes]:
    header = msgpack.unpackb(frames[0])
    change(header)
    return [msgpack.packb(header), *frames[1:]]


def pack_repeating(value: object, target: dict, key: str, extra: object, at: int) -> bytes:
    """msgpack of `value` in which the map `target` (found by identity) holds `key` a second time,
    with the value `extra`, as its entry number `at` (msgpack.packb of a dict cannot repeat a key)."""
    if type(value) is list:
        return PACKER.pack_array_header(len(value)) + b"".join(pack_repeating(v, target, key, extra, at)
                                                               for v in value)
    if type(value) is not dict:
        return PACKER.pack(value)
    pairs = list(value.items())
    if value is target:
        pairs.insert(at, (key, extra))
    return PACKER.pack_map_header(len(pairs)) + b"".join(PACKER.pack(k) + pack_repeating(v, target, key, extra, at)
                                                         for k, v in pairs)


def with_raw_value(header: dict, key: str, raw: bytes) -> bytes:
    """msgpack of `header` with the value of `key` (added if absent) written as the msgpack bytes
    `raw`: values nested past msgpack.packb's own limit of 511 levels."""
    pairs = {**header, key: None}
    return PACKER.pack_map_header(len(pairs)) + b"".join(PACKER.pack(k) + (raw if k == key else PACKER.pack(v))
                                                         for k, v in pairs.items())


def nested(depth: int, maps: bool) -> object:
    """0 inside `depth` arrays, or maps {"k": ...}."""
    value: object = 0
    for _ in range(depth):
        value = {"k": value} if maps else [value]
    return value


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=10))
def test_random_bytes(frames: list[bytes]) -> None:
    outcome(frames)


@FUZZ
@given(st.lists(values, max_size=3), st.lists(st.binary(max_size=16), max_size=3))
def test_random_msgpack_headers(header: object, buffers: list[bytes]) -> None:
    assert outcome([msgpack.packb(header), *buffers]) is None


@FUZZ
@given(valid_frames, st.data())
def test_truncated_frames(frames: list[bytes], data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(frames) - 1))
    if not frames[index]:
        return
    cut = data.draw(st.integers(0, len(frames[index]) - 1))
    frames = [*frames[:index], frames[index][:cut], *frames[index + 1 :]]
    assert outcome(frames) is None


@FUZZ
@given(valid_frames, st.data())
def test_flipped_header_bytes(frames: list[bytes], data: st.DataObject) -> None:
    header = bytearray(frames[0])
    for _ in range(data.draw(st.integers(1, 4))):
        header[data.draw(st.integers(0, len(header) - 1))] = data.draw(st.integers(0, 255))
    outcome([bytes(header), *frames[1:]])


@FUZZ
@given(valid_frames, st.data())
def test_wrong_frame_counts(frames: list[bytes], data: st.DataObject) -> None:
    extra = data.draw(st.lists(st.binary(max_size=8), min_size=1, max_size=3))
    assert outcome(frames + extra) is None
    if len(frames) > 1:
        assert outcome(frames[: data.draw(st.integers(0, len(frames) - 1))]) is None


@FUZZ
@given(valid_frames, st.data(), values)
def test_wrong_field_values(frames: list[bytes], data: st.DataObject, value: object) -> None:
    field = data.draw(st.sampled_from(sorted(msgpack.unpackb(frames[0]))))
    result = outcome(repack(frames, lambda h: h.__setitem__(field, value)))
    if result is not None and field not in ("v", "kind", "tensors"):
        # only a value of the right type and range passes, and it arrives unchanged (NaN too)
        assert msgpack.packb(getattr(result, field)) == msgpack.packb(value)


@FUZZ
@given(valid_frames, st.data())
def test_a_key_repeated_in_any_map_is_rejected(frames: list[bytes], data: st.DataObject) -> None:
    header = msgpack.unpackb(frames[0])
    maps = [header, *header["tensors"], *([header["values"]] if header.get("values") else [])]
    target = data.draw(st.sampled_from(maps))
    key = data.draw(st.sampled_from(sorted(target)))
    extra = data.draw(st.just(target[key]) | values)  # the same value, or any other
    at = data.draw(st.integers(0, len(target)))
    with pytest.raises(wire.WireError, match="^header: duplicate key"):
        wire.decode([pack_repeating(header, target, key, extra, at), *frames[1:]])


@FUZZ
@given(valid_frames, st.data(), st.integers(1, 400), st.booleans())
def test_nesting_past_the_limit_is_the_error_named(frames: list[bytes], data: st.DataObject, depth: int,
                                                   maps: bool) -> None:
    header = msgpack.unpackb(frames[0])
    # (container, key, the level at which a container put there sits): the header is level 1
    places = [(header, key, 2) for key in header]
    places += [(header["tensors"], i, 3) for i in range(len(header["tensors"]))]
    places += [(header["values"], key, 3) for key in header.get("values", {})]
    for desc in header["tensors"]:
        places += [(desc, key, 4) for key in desc] + [(desc["shape"], i, 5) for i in range(len(desc["shape"]))]
    container, key, level = data.draw(st.sampled_from(places))
    container[key] = nested(depth, maps)
    frames = [msgpack.packb(header), *frames[1:]]
    if level + depth - 1 > wire.DEFAULT_LIMITS.max_depth:
        with pytest.raises(wire.WireError, match=f"^{DEEP}"):
            wire.decode(frames)
    else:
        outcome(frames)


@pytest.mark.parametrize(
    "header",
    [
        b"\x91" * 1000 + b"\xc0",  # the fuzzer's 1001-byte frame: it killed nodes with a RecursionError
        b"\x81\xa1k" * 1024 + b"\xc0",  # maps, as deep as msgpack decodes
        with_raw_value(END, "seq", b"\x91" * 1000 + b"\x00"),
        with_raw_value(END, "extra", b"\x81\xa1k" * 1000 + b"\x00"),
    ],
    ids=["array", "maps", "field", "unknown-field"],
)
def test_nesting_a_thousand_deep_is_rejected_without_recursion(header: bytes) -> None:
    with pytest.raises(wire.WireError, match=f"^{DEEP}"):
        wire.decode([header])


@FUZZ
@given(valid_frames, st.text(min_size=1, max_size=10), values)
def test_extra_unknown_fields(frames: list[bytes], name: str, value: object) -> None:
    if name in msgpack.unpackb(frames[0]):
        return
    assert outcome(repack(frames, lambda h: h.__setitem__(name, value))) is None


@FUZZ
@given(valid_frames, st.integers(-(2**63), 2**64 - 1).filter(lambda v: v != 1) | st.floats() | st.text())
def test_unknown_versions(frames: list[bytes], version: object) -> None:
    with pytest.raises(wire.WireError, match="^header.v:"):
        wire.decode(repack(frames, lambda h: h.__setitem__("v", version)))


@FUZZ
@given(valid_frames, st.text(max_size=12).filter(lambda k: k not in wire.KINDS))
def test_unknown_kinds(frames: list[bytes], kind: str) -> None:
    with pytest.raises(wire.WireError, match="^header.kind:"):
        wire.decode(repack(frames, lambda h: h.__setitem__("kind", kind)))


@FUZZ
@given(
    st.sampled_from(list(wire.DTYPES)),
    st.lists(st.integers(0, 2**64 - 1), max_size=10),
    st.integers(0, 2**64 - 1),
    st.integers(0, 64),
)
def test_shape_and_byte_length_must_agree(dtype: str, shape: list[int], nbytes: int, length: int) -> None:
    header = {"v": 1, "kind": "grad", "edge": "e", "seq": 0,
              "tensors": [{"name": "dh", "dtype": dtype, "shape": shape, "nbytes": nbytes}]}
    result = outcome([msgpack.packb(header), bytes(length)])
    itemsize = wire.DTYPES[dtype].itemsize
    numel = 1
    for size in shape:
        numel *= size
    extent = itemsize
    for size in shape:
        extent *= max(size, 1)
    in_range = all(size < 2**63 for size in shape) and nbytes < 2**63 and extent <= 1 << 30
    consistent = in_range and len(shape) <= 8 and nbytes == numel * itemsize == length
    assert (result is not None) == consistent
    if result is not None:
        assert list(result.dh.shape) == shape


@pytest.mark.parametrize(
    "shape, nbytes",
    [([2**40, 2**40], 16), ([2**30, 2**30], 2**62), ([2**31, 2**31], 2**64 - 1), ([2**62] * 8, 0), ([2**33], 2**35),
     ([0, 2**40, 2**40], 0)],
)
def test_absurd_claimed_sizes_fail_fast_without_allocating(shape: list[int], nbytes: int) -> None:
    header = msgpack.packb({"v": 1, "kind": "act", "edge": "e", "seq": 0, "phase": "train",
                            "tensors": [{"name": "h", "dtype": "float32", "shape": shape, "nbytes": nbytes}]})
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(wire.WireError, match=r"^act\.tensors\[0\]\.(nbytes|shape):"):
        wire.decode([header, b"\0" * 16])
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 1 << 20


@pytest.mark.parametrize(
    "header",
    [
        b"\x91" * 100_000,  # nesting deeper than the unpacker's stack
        b"\xa2\xff\xfe",  # str that is not UTF-8
        b"\xdd\xff\xff\xff\xff",  # array claiming 2**32 - 1 items
        b"\xdf\xff\xff\xff\xff",  # map claiming 2**32 - 1 entries
        b"\xdb\xff\xff\xff\xff",  # str claiming 4 GiB
        b"\xc7\x01\x05a",  # ext type
        b"\xd6\xff\x00\x00\x00\x00",  # timestamp ext
        msgpack.packb({1: 2}),  # non-string key
        msgpack.packb({"v": 1, "kind": "end", "edge": "e", "seq": 1, "tensors": []}) + b"\x00",  # trailing data
        b"",
    ],
)
def test_hostile_msgpack(header: bytes) -> None:
    with pytest.raises(wire.WireError, match="^header"):
        wire.decode([header])


@pytest.mark.parametrize("frame", [None, 3, "text", [b"x"]])
def test_frames_that_are_not_bytes(frame: object) -> None:
    with pytest.raises(wire.WireError, match=r"^frames\[0\]:"):
        wire.decode([frame])
