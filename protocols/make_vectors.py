"""Write the golden vectors of protocols/wire-v1.md into protocols/vectors/.

The vectors pin the exact bytes of the protocol so that the Python codec cannot drift and so
that an implementation in another language can test itself against them (format:
protocols/vectors/README.md). Everything here is built from fixed numbers, so a rerun writes
identical files; `--check` only compares and exits 1 when a file is missing, stale or extra.

    python protocols/make_vectors.py          # (re)write the vectors
    python protocols/make_vectors.py --check  # verify them, write nothing
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import msgpack
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing the package
    sys.path.insert(0, str(ROOT))
from dni_mesh import wire  # noqa: E402

VECTORS = ROOT / "protocols" / "vectors"


def _bf16_words(*words: int) -> torch.Tensor:
    """A bfloat16 tensor with exactly these raw 16-bit patterns (NaN payloads included)."""
    return torch.from_numpy(np.array(words, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)


def _valid() -> list[tuple[str, str, wire.Message]]:
    """(name, description, message) of every valid vector: each kind and each dtype once at least."""
    grid = torch.arange(6, dtype=torch.float32).reshape(2, 3) - 2.5
    return [
        ("act_float32", "act with a float32 h and int64 labels (cDNI)",
         wire.Activation("l1->l2", 7, grid, torch.tensor([3, 9], dtype=torch.int64))),
        ("act_float64_eval", "act without labels in the eval phase",
         wire.Activation("l1->l2", 8, grid.double() / 4, phase="eval")),
        ("act_float16", "act with a float16 h", wire.Activation("e", 0, grid.half())),
        ("act_int64", "act with an int64 h (e.g. token ids)",
         wire.Activation("e", 1, torch.tensor([[-1, 2**40], [0, 2**62]], dtype=torch.int64))),
        ("act_int32", "act with an int32 h",
         wire.Activation("e", 2, torch.tensor([-2**31, 0, 2**31 - 1], dtype=torch.int32))),
        ("act_uint8", "act with a uint8 h (e.g. raw pixels)",
         wire.Activation("e", 3, torch.tensor([[0, 127], [128, 255]], dtype=torch.uint8))),
        ("act_bool", "act with a bool h (one byte each, 0 or 1)",
         wire.Activation("e", 4, torch.tensor([True, False, True]))),
        ("act_empty", "act with an empty h of shape [0, 4]: zero-length buffer frame",
         wire.Activation("e", 5, torch.zeros(0, 4))),
        ("act_scalar", "act with a 0-d h: shape [], one element", wire.Activation("e", 6, torch.tensor(1.5))),
        ("grad_bfloat16", "grad with bfloat16 dh: 1, -2, +inf, -inf, quiet NaN, NaN with payload 0x25, "
         "all-ones NaN, -0, smallest subnormal (raw words)",
         wire.Gradient("l2->head", 7,
                       _bf16_words(0x3F80, 0xC000, 0x7F80, 0xFF80, 0x7FC0, 0x7FA5, 0xFFFF, 0x8000, 0x0001))),
        ("grad_float32", "grad with a float32 dh", wire.Gradient("l1->l2", 7, grid / 8)),
        ("grad_credit", "grad without dh: a credit only", wire.Gradient("l1->l2", 9)),
        ("hello", "hello from a node to the launcher",
         wire.Hello("l1", 4242, "worker-3", "tcp://10.0.0.3:5555")),
        ("bound", "bound: l1's inbox took port 40123, chosen at run time",
         wire.Bound("l1", "tcp://10.0.0.3:40123")),
        ("peers", "peers: where l2's neighbours listen",
         wire.Peers({"l1": "tcp://10.0.0.3:40123", "head": "tcp://10.0.0.4:5602"})),
        ("ready", "ready", wire.Ready("l1")),
        ("heartbeat", "heartbeat at step 1200", wire.Heartbeat("l1", 1200, 1700000000.25)),
        ("metrics", "metrics with an int, a float and a string value",
         wire.Metrics("head", 300, {"loss": 0.125, "correct": 231, "phase": "train"})),
        ("stop", "stop", wire.Stop("launcher", "epochs done")),
        ("end", "end of the edge after 600 messages", wire.End("l1->l2", 600)),
        ("end_ack", "end_ack answering that end", wire.EndAck("l1->l2", 600)),
        ("rejoin", "rejoin: a restarted l2 resumes its checkpoint at seq 400", wire.Rejoin("l1->l2", 400)),
        ("error", "error report (UTF-8 text)", wire.Error("l2", "CUDA out of memory — batch 256")),
    ]


def _frames(header: dict | bytes, *buffers: bytes) -> list[bytes]:
    return [header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True), *buffers]


class _Raw(bytes):
    """msgpack bytes written pair by pair: a map that repeats a key, which no dict can hold."""


_PACKER = msgpack.Packer(use_bin_type=True)


def _pack(value: object) -> bytes:
    """msgpack.packb, with _Raw parts spliced in as they are (only lists can hold them here)."""
    if isinstance(value, _Raw):
        return value
    if isinstance(value, list):
        return _PACKER.pack_array_header(len(value)) + b"".join(map(_pack, value))
    return _PACKER.pack(value)


def _map(*pairs: tuple[str, object]) -> _Raw:
    """A msgpack map of `pairs` in this order, repeated keys included."""
    return _Raw(_PACKER.pack_map_header(len(pairs)) + b"".join(_pack(key) + _pack(value) for key, value in pairs))


def _invalid() -> list[tuple[str, str, str, list[bytes]]]:
    """(name, description, field path the error names, frames) of vectors a receiver must drop."""
    frames = [bytes(f) for f in wire.encode(wire.Activation("e", 1, torch.zeros(2, 2), torch.tensor([1, 0])))]
    act = msgpack.unpackb(frames[0])
    h, labels = act["tensors"]
    end = {"v": 1, "kind": "end", "edge": "e", "seq": 3, "tensors": []}

    def act_frames(**changes: object) -> list[bytes]:
        """The act above with header fields replaced, buffers unchanged."""
        return _frames({**act, **changes}, *frames[1:])

    def h_frames(**changes: object) -> list[bytes]:
        """The act above with h's descriptor changed."""
        return act_frames(tensors=[{**h, **changes}, labels])

    bool_h = {"name": "h", "dtype": "bool", "shape": [2], "nbytes": 2}
    metrics = {"v": 1, "kind": "metrics", "node": "n", "step": 1}
    grad_h = {"v": 1, "kind": "grad", "edge": "e", "seq": 1,
              "tensors": [{"name": "h", "dtype": "uint8", "shape": [1], "nbytes": 1}]}
    return [
        ("not_msgpack", "header frame is not msgpack", "header", [b"\xc1"]),
        ("header_not_map", "header is a msgpack array", "header", _frames([1, "end"])),
        ("header_too_big", "header frame over max_header_bytes (65536)", "header",
         _frames({**end, "edge": "x" * 70000})),
        ("unknown_version", "v = 2", "header.v", _frames({**end, "v": 2})),
        ("version_as_string", "v = \"1\"", "header.v", _frames({**end, "v": "1"})),
        ("unknown_kind", "kind = checkpoint", "header.kind", _frames({**end, "kind": "checkpoint"})),
        ("missing_field", "end without seq", "end", _frames({k: v for k, v in end.items() if k != "seq"})),
        ("unknown_field", "end with an extra field", "end", _frames({**end, "color": "red"})),
        ("bool_seq", "seq = true (bool is not an integer)", "end.seq", _frames({**end, "seq": True})),
        ("negative_seq", "seq = -1", "end.seq", _frames({**end, "seq": -1})),
        ("float_time", "heartbeat time sent as an integer", "heartbeat.time",
         _frames({"v": 1, "kind": "heartbeat", "node": "n", "step": 1, "time": 5, "tensors": []})),
        ("bad_phase", "phase = test", "act.phase", act_frames(phase="test")),
        ("peer_port_zero", "peers naming an address with port 0 (nothing can dial it)", "peers.addresses",
         _frames({"v": 1, "kind": "peers", "addresses": {"l1": "tcp://10.0.0.3:0"}, "tensors": []})),
        ("extra_frame", "one more buffer frame than tensors", "frames", [*frames, b""]),
        ("missing_frame", "labels frame missing", "frames", frames[:2]),
        ("nbytes_mismatch", "nbytes != prod(shape) * itemsize", "act.tensors[0].nbytes", h_frames(nbytes=12)),
        ("frame_too_short", "buffer frame shorter than nbytes", "act.tensors[0]",
         [frames[0], frames[1][:-1], frames[2]]),
        ("absurd_shape", "shape [2**40, 2**40] claiming 16 bytes", "act.tensors[0].nbytes",
         h_frames(shape=[2**40, 2**40])),
        ("huge_tensor", "consistent shape [2**30, 2**30] float32 (2**62 bytes) over max_tensor_bytes",
         "act.tensors[0].nbytes", h_frames(shape=[2**30, 2**30], nbytes=2**62)),
        ("too_many_dims", "9 dims (limit 8)", "act.tensors[0].shape", h_frames(shape=[1] * 9, nbytes=4)),
        ("negative_dim", "shape [-2, -2]", "act.tensors[0].shape[0]", h_frames(shape=[-2, -2])),
        ("unsupported_dtype", "dtype complex64", "act.tensors[0].dtype", h_frames(dtype="complex64")),
        ("labels_not_int64", "labels declared float64", "act.tensors[1].dtype",
         act_frames(tensors=[h, {**labels, "dtype": "float64"}])),
        ("wrong_tensor_name", "grad carrying a tensor named h", "grad.tensors", _frames(grad_h, b"\x00")),
        ("bool_byte_2", "bool tensor holding byte 0x02", "act.tensors[0]",
         _frames({**act, "tensors": [bool_h]}, b"\x01\x02")),
        ("duplicate_header_key", "end with seq twice (3, then 4)", "header", _frames(_map(*end.items(), ("seq", 4)))),
        ("duplicate_descriptor_key", "h's descriptor with shape twice ([2, 2], then [4]: both agree with nbytes)",
         "header", _frames(_map(*{**act, "tensors": [_map(*h.items(), ("shape", [4])), labels]}.items()), *frames[1:])),
        ("duplicate_metrics_key", "metrics values with loss twice", "header",
         _frames(_map(*metrics.items(), ("values", _map(("loss", 0.5), ("loss", 0.25))), ("tensors", [])))),
        ("nested_1000", "one 1001-byte frame: an array nested 1000 deep (limit 4)", "header",
         [b"\x91" * 1000 + b"\xc0"]),
        ("nested_5", "shape [[2, 2]]: one level past the depth limit of 4", "header", h_frames(shape=[[2, 2]])),
    ]


def _json_values(tensor: torch.Tensor) -> object | None:
    """Tensor values for human readers; None where JSON cannot hold them exactly (NaN, inf)."""
    values = tensor.tolist()
    flat = tensor.reshape(-1).double().tolist() if tensor.is_floating_point() else []
    return None if any(not math.isfinite(v) for v in flat) else values


def _valid_doc(name: str, description: str, msg: wire.Message) -> dict:
    frames = [bytes(f) for f in wire.encode(msg)]
    doc: dict = {"name": name, "description": description, "valid": True,
                 "header": msgpack.unpackb(frames[0])}
    tensors = {n: getattr(msg, n) for n in ("h", "labels", "dh") if getattr(msg, n, None) is not None}
    values = {n: v for n, v in ((n, _json_values(t)) for n, t in tensors.items()) if v is not None}
    if values:
        doc["values"] = values
    doc["frames"] = [f.hex() for f in frames]
    return doc


def build() -> dict[str, str]:
    """Relative path -> file text of every vector."""
    docs = {f"{name}.json": _valid_doc(name, text, msg) for name, text, msg in _valid()}
    docs.update(
        (f"invalid/{name}.json",
         {"name": name, "description": text, "valid": False, "error": where,
          "frames": [f.hex() for f in frames]})
        for name, text, where, frames in _invalid()
    )
    return {path: _dump(doc) for path, doc in docs.items()}


def _dump(doc: dict) -> str:
    """JSON with one top-level key per line: easy to read and to diff, still plain JSON."""
    lines = (f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}" for key, value in doc.items())
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the files; write nothing")
    check = parser.parse_args().check
    wanted = build()
    present = {str(p.relative_to(VECTORS)) for p in VECTORS.rglob("*.json")}
    stale = sorted(
        path for path, text in wanted.items()
        if path not in present or (VECTORS / path).read_text(encoding="utf-8") != text
    )
    extra = sorted(present - wanted.keys())
    if check:
        for path in stale + extra:
            print(f"out of date: {path}", file=sys.stderr)
        return 1 if stale or extra else 0
    for path in stale:
        (VECTORS / path).parent.mkdir(parents=True, exist_ok=True)
        (VECTORS / path).write_text(wanted[path], encoding="utf-8")
    for path in extra:
        (VECTORS / path).unlink()
    print(f"{len(wanted)} vectors: {len(stale)} written, {len(extra)} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
