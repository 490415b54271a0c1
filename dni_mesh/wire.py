"""Wire codec: messages <-> ZeroMQ multipart frames (spec: protocols/wire-v1.md).

A message is one msgpack header frame (a map) followed by one raw little-endian, C-contiguous
buffer frame per tensor. The codec is pure (no sockets) so that it can be tested byte for byte
against the golden vectors in protocols/vectors/ and reused by any transport.

Frames come from untrusted peers, so `decode` checks everything it can from the header and the
frame lengths *before* it builds a tensor or allocates memory sized by the sender, and it raises
only `WireError`. Nothing here unpickles, evaluates or imports what it reads.
"""

from __future__ import annotations

import math
import re
import reprlib
import sys
from collections.abc import Callable, KeysView, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import msgpack
import numpy as np
import torch

if sys.byteorder != "little":  # buffers are shipped as raw host words
    raise ImportError("dni_mesh.wire supports little-endian hosts only")

PROTOCOL_VERSION = 1
PHASES = ("train", "eval")

# Wire dtype name -> torch dtype. bfloat16 travels as its raw 2-byte words.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Tensors whose dtype the protocol fixes (labels are class indices).
_FIXED_DTYPES = {"labels": "int64"}
# Ordered like a tuple (for error texts), compared like a set (one C call on the hot path).
_TENSOR_KEYS = dict.fromkeys(("name", "dtype", "shape", "nbytes")).keys()
# numpy has no bfloat16: its words are exported through a same-size integer view.
_EXPORT_DTYPES = {torch.bfloat16: torch.int16}
_INT64_MAX = 2**63 - 1


class WireError(ValueError):
    """The one error `decode` raises: the text names the field and the problem."""


@dataclass(frozen=True)
class Limits:
    """Receiver-side bounds, checked before anything sized by the sender is allocated."""

    max_header_bytes: int = 64 * 1024
    max_depth: int = 4  # maps and arrays nested in the header, itself included: header, tensors, descriptor, shape
    max_dims: int = 8
    max_tensors: int = 8
    max_tensor_bytes: int = 1 << 30
    max_message_bytes: int = 1 << 31  # sum of the buffer frames


DEFAULT_LIMITS = Limits()

Check = Callable[[object], Union[str, None]]  # returns the problem, or None when valid


def _bounded_repr() -> reprlib.Repr:
    shown = reprlib.Repr()
    shown.maxlevel = 2  # reprlib recurses one call per level: deeper values show as [...]
    shown.maxdict = shown.maxlist = 4
    shown.maxstring = shown.maxother = 40
    return shown


_SHOWN = _bounded_repr()


def _clip(value: object) -> str:
    """A short repr for error texts, bounded in work as well as length: a peer may send megabytes,
    or a value nested a thousand deep that would exhaust the interpreter's stack in plain repr()."""
    text = _SHOWN.repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _show(value: object) -> str:
    return f"{type(value).__name__} {_clip(value)}"


def _text(value: object) -> str | None:
    return None if type(value) is str else f"must be a string, got {_show(value)}"


def _count(value: object) -> str | None:
    # `type(...) is int` on purpose: msgpack booleans decode as bool, a subclass of int.
    if type(value) is int and 0 <= value <= _INT64_MAX:
        return None
    return f"must be an integer in [0, 2**63), got {_show(value)}"


def _real(value: object) -> str | None:
    return None if type(value) is float else f"must be a float, got {_show(value)}"


def _phase(value: object) -> str | None:
    if type(value) is str and value in PHASES:
        return None
    return f"must be 'train' or 'eval', got {_show(value)}"


def _string_map(value: object, check: Check) -> str | None:
    """A map with string keys whose every value passes `check`."""
    if type(value) is not dict:
        return f"must be a map, got {_show(value)}"
    for key, item in value.items():
        if type(key) is not str:
            return f"keys must be strings, got {_show(key)}"
        if (problem := check(item)) is not None:
            return f"[{_clip(key)}] {problem}"
    return None


def _value(value: object) -> str | None:
    if type(value) is int and -_INT64_MAX - 1 <= value <= _INT64_MAX:
        return None
    if type(value) in (float, str):
        return None
    return f"must be an int64, float or string, got {_show(value)}"


def _values(value: object) -> str | None:
    return _string_map(value, _value)


_ENDPOINT = re.compile(r"tcp://[A-Za-z0-9.\-]{1,253}:([0-9]{1,5})")


def _endpoint(value: object) -> str | None:
    """A ZeroMQ tcp endpoint a peer can dial: tcp://host:port, the port in [1, 65535]."""
    if type(value) is str and (found := _ENDPOINT.fullmatch(value)) and 0 < int(found[1]) < 65536:
        return None
    return f"must be an endpoint tcp://HOST:PORT with a port in [1, 65535], got {_show(value)}"


def _endpoints(value: object) -> str | None:
    return _string_map(value, _endpoint)


@dataclass(frozen=True)
class _Message:
    """Base of all messages: validates on construction, so encode only ships valid messages."""

    KIND: ClassVar[str]
    FIELDS: ClassVar[tuple[tuple[str, Check], ...]]  # header scalars, in wire order
    TENSORS: ClassVar[tuple[str, ...]] = ()  # tensor fields (None = absent), in frame order
    LAYOUTS: ClassVar[tuple[tuple[str, ...], ...]] = ((),)  # allowed tensor names, in frame order
    HEADER_KEYS: ClassVar[KeysView[str]]  # every header key, in canonical order

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.HEADER_KEYS = dict.fromkeys(("v", "kind", *(name for name, _ in cls.FIELDS), "tensors")).keys()

    def __post_init__(self) -> None:
        for name, check in self.FIELDS:
            _require(check(getattr(self, name)), self.KIND, name)
        present = _tensor_names(self)
        if present not in self.LAYOUTS:
            raise WireError(f"{self.KIND}.tensors: {list(present)} is not one of {_layouts(self)}")
        for name in present:
            _check_tensor(getattr(self, name), self.KIND, name)

    @classmethod
    def _checked(cls, values: dict[str, object]) -> _Message:
        """Build from every field's value, already validated by `decode`, without __post_init__
        checking them a second time (decode is on every received message's path)."""
        msg = object.__new__(cls)
        object.__setattr__(msg, "__dict__", values)  # frozen: no plain attribute assignment
        return msg


@dataclass(frozen=True, eq=False)
class Activation(_Message):
    """Forward message on an edge: the activation h (and, for cDNI, the labels) of step seq."""

    KIND = "act"
    FIELDS = (("edge", _text), ("seq", _count), ("phase", _phase))
    TENSORS = ("h", "labels")
    LAYOUTS = (("h",), ("h", "labels"))
    edge: str
    seq: int
    h: torch.Tensor
    labels: torch.Tensor | None = None
    phase: str = "train"


@dataclass(frozen=True, eq=False)
class Gradient(_Message):
    """Backward message: dL/dh for step seq. dh None is a bare credit (no gradient to fit)."""

    KIND = "grad"
    FIELDS = (("edge", _text), ("seq", _count))
    TENSORS = ("dh",)
    LAYOUTS = ((), ("dh",))
    edge: str
    seq: int
    dh: torch.Tensor | None = None


@dataclass(frozen=True)
class Hello(_Message):
    """A node announces itself to the launcher: who, which process, where its inbox listens."""

    KIND = "hello"
    FIELDS = (("node", _text), ("pid", _count), ("host", _text), ("address", _text))
    node: str
    pid: int
    host: str
    address: str


@dataclass(frozen=True)
class Bound(_Message):
    """A node's inbox is bound: where its peers must dial it (a port of 0 in the topology has
    become the one the system chose)."""

    KIND = "bound"
    FIELDS = (("node", _text), ("address", _endpoint))
    node: str
    address: str


@dataclass(frozen=True)
class Peers(_Message):
    """The launcher tells a node where each of its neighbours' inboxes listens, before it dials
    them."""

    KIND = "peers"
    FIELDS = (("addresses", _endpoints),)
    addresses: dict[str, str]


@dataclass(frozen=True)
class Ready(_Message):
    """A node has connected to all its peers and can take traffic."""

    KIND = "ready"
    FIELDS = (("node", _text),)
    node: str


@dataclass(frozen=True)
class Heartbeat(_Message):
    """Application liveness: the step counter proves the Python loop advances, not just libzmq."""

    KIND = "heartbeat"
    FIELDS = (("node", _text), ("step", _count), ("time", _real))
    node: str
    step: int
    time: float


@dataclass(frozen=True)
class Metrics(_Message):
    """Named scalar measurements of a node at a step (loss, accuracy, counters)."""

    KIND = "metrics"
    FIELDS = (("node", _text), ("step", _count), ("values", _values))
    node: str
    step: int
    values: dict[str, float | int | str]


@dataclass(frozen=True)
class Stop(_Message):
    """Ask a node (or tell the launcher) to stop, with a human-readable reason."""

    KIND = "stop"
    FIELDS = (("node", _text), ("reason", _text))
    node: str
    reason: str


@dataclass(frozen=True)
class End(_Message):
    """No more messages on this edge; seq is the position after them: one past the last seq
    sent on it (the number sent, unless the edge skipped seqs when a node rejoined)."""

    KIND = "end"
    FIELDS = (("edge", _text), ("seq", _count))
    edge: str
    seq: int


@dataclass(frozen=True)
class EndAck(_Message):
    """The receiver has taken End out of its inbox; echoes End's edge and seq."""

    KIND = "end_ack"
    FIELDS = (("edge", _text), ("seq", _count))
    edge: str
    seq: int


@dataclass(frozen=True)
class Rejoin(_Message):
    """A restarted node and each neighbour tell each other where they stand on an edge: the
    restarted node sends the seq its checkpoint resumes at; a neighbour answers with its
    position (a producer: the next seq it will send; a consumer: the next seq it expects)."""

    KIND = "rejoin"
    FIELDS = (("edge", _text), ("seq", _count))
    edge: str
    seq: int


@dataclass(frozen=True)
class Error(_Message):
    """A node reports a failure (to the launcher) as text."""

    KIND = "error"
    FIELDS = (("node", _text), ("text", _text))
    node: str
    text: str


Message = Union[Activation, Gradient, Hello, Bound, Peers, Ready, Heartbeat, Metrics, Stop, End,
                EndAck, Rejoin, Error]
KINDS: dict[str, type[_Message]] = {
    cls.KIND: cls for cls in (Activation, Gradient, Hello, Bound, Peers, Ready, Heartbeat, Metrics,
                              Stop, End, EndAck, Rejoin, Error)
}


def _require(problem: str | None, where: str, field: str) -> None:
    """Raise for `problem` in where.field; the text is built only when there is a problem."""
    if problem is not None:
        raise WireError(f"{where}.{field}: {problem}")


def _tensor_names(msg: _Message) -> tuple[str, ...]:
    """Names of the tensors a message carries, in frame order (None means absent)."""
    return tuple(name for name in msg.TENSORS if getattr(msg, name) is not None)


def _layouts(cls: type[_Message] | _Message) -> str:
    return " or ".join(str(list(layout)) for layout in cls.LAYOUTS)


def _check_tensor(tensor: object, kind: str, field: str) -> None:
    where, fixed_dtype = f"{kind}.{field}", _FIXED_DTYPES.get(field)
    if not isinstance(tensor, torch.Tensor):
        raise WireError(f"{where}: must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise WireError(f"{where}: only dense (strided) tensors can be sent, got {tensor.layout}")
    name = _DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise WireError(f"{where}: unsupported dtype {tensor.dtype}; supported: {', '.join(DTYPES)}")
    if fixed_dtype is not None and name != fixed_dtype:
        raise WireError(f"{where}: must be {fixed_dtype}, got {name}")


def _buffer(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, C-contiguous, without copying when it already is on the CPU and dense."""
    # The common case in one call. numpy() refuses tensors that need grad, are not on the CPU or are
    # bfloat16, and cast() refuses non-contiguous ones: those take the slower path below.
    try:
        return memoryview(tensor.numpy()).cast("B")
    except (RuntimeError, TypeError):
        pass
    tensor = tensor.detach()
    if not (tensor.is_cpu and tensor.is_contiguous()):
        tensor = tensor.cpu().contiguous()
    if tensor.numel() == 0:
        return memoryview(b"")  # memoryview cannot cast a shape with zeros
    export = _EXPORT_DTYPES.get(tensor.dtype)
    # The memoryview keeps the tensor's storage alive until the transport releases the frame.
    return memoryview((tensor if export is None else tensor.view(export)).numpy()).cast("B")


def encode(msg: Message) -> list[bytes | memoryview]:
    """Frames for `msg`: the msgpack header, then one zero-copy buffer per tensor.

    Header keys are written in a fixed order so equal messages give identical bytes. The buffers
    alias the tensors' memory: do not modify a tensor in place until its frames have been sent.
    """
    if not isinstance(msg, _Message):
        raise TypeError(f"encode: not a wire message: {type(msg).__name__}")
    header: dict[str, object] = {"v": PROTOCOL_VERSION, "kind": msg.KIND}
    for name, _ in msg.FIELDS:
        header[name] = getattr(msg, name)
    frames: list[bytes | memoryview] = [b""]
    descriptors = []
    for name in msg.TENSORS:
        tensor = getattr(msg, name)
        if tensor is not None:
            frames.append(buf := _buffer(tensor))
            descriptors.append({"name": name, "dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                                "nbytes": buf.nbytes})
    header["tensors"] = descriptors
    frames[0] = msgpack.packb(header, use_bin_type=True)
    return frames


def _as_bytes(frame: object, index: int) -> memoryview:
    """A flat byte view of frames[index] (bytes, bytearray, memoryview, zmq.Frame, ...)."""
    try:
        view = memoryview(frame)  # type: ignore[arg-type]
    except TypeError:
        raise WireError(f"frames[{index}]: not a bytes-like object: {type(frame).__name__}") from None
    if view.ndim == 1 and view.format == "B":
        return view
    if not view.c_contiguous:
        raise WireError(f"frames[{index}]: buffer is not contiguous")
    return view.cast("B")


def _reason(exc: BaseException) -> str:
    """A msgpack error's name and message, without its repr(): ExtraData's holds the value decoded
    (nested to any depth) and every trailing byte."""
    message = exc.args[0] if len(exc.args) == 1 and type(exc.args[0]) is str else ""
    return f"{type(exc).__name__}: {message[:80]}" if message else type(exc).__name__


def _unpack_header(frame: memoryview, limits: Limits) -> Any:
    """The one msgpack value in the header frame, of any type (decode checks it is a map), with no
    map that repeats a key."""
    if frame.nbytes > limits.max_header_bytes:
        raise WireError(f"header: {frame.nbytes} bytes exceeds the limit of {limits.max_header_bytes}")
    try:
        return msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            object_pairs_hook=_unique_keys,
            max_str_len=limits.max_header_bytes,
            max_bin_len=limits.max_header_bytes,
            max_array_len=limits.max_header_bytes,  # bounds allocation; the checks below
            max_map_len=limits.max_header_bytes,  # give the precise errors (dims, tensors)
            max_ext_len=0,
        )
    except WireError:  # a repeated key, from _unique_keys
        raise
    except (ValueError, msgpack.UnpackException) as exc:  # every malformed-msgpack error
        raise WireError(f"header: not valid msgpack ({_reason(exc)})") from None


def _unique_keys(pairs: list[tuple[object, object]]) -> dict:
    """msgpack's object_pairs_hook: the map as a dict, refusing a key that comes twice (a dict would
    keep the last value silently, so two receivers could read different values from one message)."""
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        seen: set[object] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise WireError(f"header: duplicate key {_clip(repeated)} in a map")
    return mapping


# The field checks accept no map or array but header -> tensors -> descriptor -> shape (and header
# -> values), so a header that passes them is at most this deep. Walking every header to measure
# its depth would add about a third to decode's time, so decode walks it only when a check fails,
# before it raises (the depth is then the error to name; the failing value was shown only through
# the bounded `_clip`), or when the limit is lower than this.
_SCHEMA_DEPTH = 4


def _check_depth(value: object, limit: int) -> None:
    """Raise WireError when maps and arrays nest more than `limit` deep in `value` (the outermost
    counts as 1). Iterative, one level at a time, and it stops one level past the limit, so a value
    nested a thousand deep costs no more than one nested just too deep."""
    level = [value]
    for depth in range(limit + 1):
        nested = []
        for node in level:
            if type(node) is dict:
                node = node.values()
            elif type(node) is not list:
                continue
            if depth == limit:
                raise WireError(f"header: nested deeper than {limit} levels of maps and arrays (max_depth)")
            nested += node
        level = nested


def _check_keys(found: dict, expected: KeysView[str], where: str) -> None:
    if found.keys() == expected:
        return
    missing = [key for key in expected if key not in found]
    if missing:
        raise WireError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = [key for key in found if key not in expected]
    raise WireError(f"{where}: unknown field(s) {', '.join(_clip(key) for key in unknown)}")


# A validated tensor descriptor and its frame: (name, dtype, shape, frame).
_Slot = tuple[str, torch.dtype, list[int], memoryview]


def _check_descriptor(desc: object, frame: memoryview, where: str, limits: Limits) -> _Slot:
    if type(desc) is not dict:
        raise WireError(f"{where}: must be a map, got {_show(desc)}")
    _check_keys(desc, _TENSOR_KEYS, where)
    name, dtype_name, shape, nbytes = desc["name"], desc["dtype"], desc["shape"], desc["nbytes"]
    _require(_text(name), where, "name")
    dtype = DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise WireError(f"{where}.dtype: unsupported {_show(dtype_name)}; supported: {', '.join(DTYPES)}")
    fixed = _FIXED_DTYPES.get(name)
    if fixed is not None and dtype_name != fixed:
        raise WireError(f"{where}.dtype: {name} must be {fixed}, got {dtype_name}")
    if type(shape) is not list:
        raise WireError(f"{where}.shape: must be a list, got {_show(shape)}")
    if len(shape) > limits.max_dims:
        raise WireError(f"{where}.shape: {len(shape)} dims exceeds the limit of {limits.max_dims}")
    for i, size in enumerate(shape):
        if _count(size) is not None:  # the field name is formatted only on error
            _require(_count(size), where, f"shape[{i}]")
    _require(_count(nbytes), where, "nbytes")
    expected = math.prod(shape) * dtype.itemsize  # exact Python ints: no overflow
    if nbytes != expected:
        raise WireError(f"{where}.nbytes: {nbytes} != prod({shape}) * {dtype.itemsize} = {expected}")
    if nbytes > limits.max_tensor_bytes:
        raise WireError(f"{where}.nbytes: {nbytes} exceeds the limit of {limits.max_tensor_bytes}")
    if nbytes == 0:  # an empty tensor still gets strides from its other dims: bound them (0 counts as 1)
        extent = math.prod(max(size, 1) for size in shape) * dtype.itemsize
        if extent > limits.max_tensor_bytes:
            raise WireError(f"{where}.shape: {shape} spans {extent} bytes (zeros as 1), over {limits.max_tensor_bytes}")
    if frame.nbytes != nbytes:
        raise WireError(f"{where}: frame has {frame.nbytes} bytes, header says {nbytes}")
    if dtype == torch.bool and nbytes and np.frombuffer(frame, dtype=np.uint8).max() > 1:
        raise WireError(f"{where}: bool bytes must be 0 or 1")
    return name, dtype, shape, frame


# Smaller frames are always copied: libzmq packs them into a shared receive buffer, often at odd
# offsets, and a view would keep that whole buffer alive; at this size a copy is the cheaper step.
SMALL_FRAME_BYTES = 64 * 1024
# Tensors are built through numpy: np.frombuffer + reshape + torch.from_numpy costs about half of
# torch.frombuffer + view (1.6 against 2.8 us at 4 KB). bfloat16 comes in as int16 words, viewed back.
_NUMPY_DTYPES = {dtype: torch.empty(0, dtype=_EXPORT_DTYPES.get(dtype, dtype)).numpy().dtype
                 for dtype in DTYPES.values()}


def _tensor(dtype: torch.dtype, shape: list[int], frame: memoryview) -> torch.Tensor:
    """A tensor over the frame's memory when that is safe and worth it, else an aligned copy.

    Zero-copy needs a writable buffer (torch has no read-only tensors; zmq frames are writable,
    `bytes` are not) of at least SMALL_FRAME_BYTES whose address is aligned to the element size.
    Either way the result is an ordinary writable CPU tensor that nothing else writes to.
    """
    if frame.nbytes == 0:
        return torch.empty(shape, dtype=dtype)  # numpy would give it zero strides
    array = np.frombuffer(frame, _NUMPY_DTYPES[dtype]).reshape(shape)
    if frame.readonly or frame.nbytes < SMALL_FRAME_BYTES or not array.flags.aligned:
        array = array.copy()  # numpy aligns what it allocates
    tensor = torch.from_numpy(array)
    return tensor if tensor.dtype == dtype else tensor.view(dtype)


def decode(frames: Sequence[object], limits: Limits = DEFAULT_LIMITS) -> Message:
    """The message in `frames` (header first, no routing-id frames), fully validated first.

    A frame is any bytes-like object: bytes, memoryview, or a received zmq.Frame as it is.
    Raises WireError, naming the field and the problem, for anything that does not follow
    protocols/wire-v1.md or exceeds `limits`. Tensors view the frames' memory where a frame is
    writable, aligned (received ZeroMQ frames are) and at least SMALL_FRAME_BYTES, and are aligned
    copies otherwise; either way they are ordinary writable CPU tensors.
    """
    if not 1 <= len(frames) <= 1 + limits.max_tensors:
        raise WireError(f"frames: {len(frames)} frames, expected 1 header + at most {limits.max_tensors} tensors")
    header = _unpack_header(_as_bytes(frames[0], 0), limits)
    try:
        cls, values, slots = _check_fields(header, frames, limits)
    except WireError:
        _check_depth(header, limits.max_depth)  # a header too deep: name that, not what it broke
        raise
    if limits.max_depth < _SCHEMA_DEPTH:
        _check_depth(header, limits.max_depth)
    for name, dtype, shape, buffer in slots:  # only now, with everything checked, build tensors
        values[name] = _tensor(dtype, shape, buffer)
    return cls._checked(values)  # type: ignore[return-value]


def _check_fields(header: object, frames: Sequence[object],
                  limits: Limits) -> tuple[type[_Message], dict[str, object], list[_Slot]]:
    """Every check of the header's fields and of the tensor frames, in the order of the spec's
    section 6: the message's class, its field values and its checked tensor slots."""
    if type(header) is not dict:
        raise WireError(f"header: must be a map, got {_show(header)}")
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError(f"header.v: unsupported protocol version {_show(version)}; this node speaks {PROTOCOL_VERSION}")
    kind = header.get("kind")
    cls = KINDS.get(kind) if type(kind) is str else None
    if cls is None:
        raise WireError(f"header.kind: unknown message kind {_show(kind)}; known: {', '.join(KINDS)}")
    _check_keys(header, cls.HEADER_KEYS, kind)
    values = dict.fromkeys(cls.TENSORS)  # absent tensors are None
    for name, check in cls.FIELDS:
        _require(check(value := header[name]), kind, name)
        values[name] = value
    descriptors = header["tensors"]
    if type(descriptors) is not list:
        raise WireError(f"{kind}.tensors: must be a list, got {_show(descriptors)}")
    if len(frames) != 1 + len(descriptors):
        raise WireError(f"frames: {len(frames)} frames, header lists {len(descriptors)} tensors (+1 header)")
    slots, total = [], 0
    for i, desc in enumerate(descriptors, 1):
        frame = _as_bytes(frames[i], i)
        slot = _check_descriptor(desc, frame, f"{kind}.tensors[{i - 1}]", limits)
        total += frame.nbytes
        if total > limits.max_message_bytes:
            raise WireError(f"{kind}.tensors: {total} bytes exceeds the limit of {limits.max_message_bytes}")
        slots.append(slot)
    names = tuple([slot[0] for slot in slots])
    if names not in cls.LAYOUTS:
        raise WireError(f"{kind}.tensors: names {list(names)} are not one of {_layouts(cls)}")
    return cls, values, slots
