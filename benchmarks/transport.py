"""Transport throughput: raw pyzmq against the full dni_mesh path, two processes on tcp loopback.

    python -m benchmarks.transport [--json PATH] [--repeats 5] [--seconds 1] [--breakdown] [--curve]

For each tensor size the sender (this process) streams messages to a receiver process:
  raw:  DEALER -> ROUTER multipart [fixed 64-byte header, tensor bytes], copy=False, same hwms;
  mesh: wire.encode + Peer.send -> Inbox.recv + wire.decode into a torch tensor, one element read;
  curve (--curve): the mesh path with CURVE on both sockets (keys made for the run), its ZAP
        handler admitting the sender; `curve_ratio` is CURVE / plain mesh throughput.
Both receivers let go of a message before taking the next: a receiver that held on to it while
receiving the next would make libzmq allocate (and the kernel fault in) fresh pages each time.
Raw and mesh trials alternate (in alternating order) so that load from other processes hits both
alike; the reported ratio is the median of the per-repeat mesh/raw ratios, rates are medians.
On a shared machine wall-clock ratios swing by tens of percent, so each row also gives the CPU time
both processes (all threads, libzmq's I/O threads included) spend per message, and `cpu_ratio`,
raw CPU / mesh CPU: the throughput ratio to expect wherever CPU is what limits.

--breakdown adds, at 4 KB, two half-mesh paths over the raw sockets, to show which end's codec
costs what: "encode" (the sender builds and encodes an Activation per message, the receiver only
receives) and "decode" (the sender sends frames encoded once, the receiver decodes each and reads
one element). It compares what each adds to its process's CPU per message in the stream with what
the same calls cost in a hot loop in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import zmq

from dni_mesh import wire
from dni_mesh.security import create_keys, curve_for
from dni_mesh.transport import Inbox, Peer, TransportConfig

SIZES = (4 << 10, 256 << 10, 1 << 20, 16 << 20)
BREAKDOWN_SIZE = 4 << 10
RAW_HEADER = bytes(64)  # about the size of wire's msgpack header
WAIT_MS = 30_000  # any single wait longer than this means the benchmark is broken, not slow
CONFIG = TransportConfig(block_timeout_ms=WAIT_MS)


def _raw_socket(context: zmq.Context, kind: int) -> zmq.Socket:
    sock = context.socket(kind)
    for option, value in ((zmq.SNDHWM, CONFIG.sndhwm), (zmq.RCVHWM, CONFIG.rcvhwm), (zmq.LINGER, 0),
                          (zmq.SNDTIMEO, WAIT_MS), (zmq.RCVTIMEO, WAIT_MS)):
        sock.setsockopt(option, value)
    return sock


def _curve_config(keys: Path, name: str, clients: tuple[str, ...]) -> TransportConfig:
    return replace(CONFIG, curve=curve_for(keys, name, clients))


@contextlib.contextmanager
def _curve_inbox(keys: Path | None, context: zmq.Context) -> Iterator[Inbox | None]:
    if keys is None:
        yield None
        return
    with Inbox("tcp://127.0.0.1:0", "receiver", _curve_config(keys, "receiver", ("sender",)), context) as inbox:
        yield inbox


def _receiver(conn: Connection, keys: Path | None) -> None:
    """Child process: bind every path, then receive `count` messages per command until None."""
    context = zmq.Context()
    raw = _raw_socket(context, zmq.ROUTER)
    raw.bind("tcp://127.0.0.1:0")
    with Inbox("tcp://127.0.0.1:0", "receiver", CONFIG, context) as inbox, _curve_inbox(keys, context) as curve:
        conn.send((raw.getsockopt_string(zmq.LAST_ENDPOINT), inbox.address, curve and curve.address))
        inboxes = {"mesh": inbox, "curve": curve}
        while (command := conn.recv()) is not None:
            mode, count = command
            cpu = time.process_time()
            for _ in range(count):
                if mode in ("raw", "encode"):
                    raw.recv_multipart(copy=False)
                    continue
                if mode == "decode":
                    message = wire.decode(raw.recv_multipart(copy=False)[1:])
                else:
                    envelope = inboxes[mode].recv(WAIT_MS)
                    if envelope is None:
                        raise TimeoutError(f"{mode} receiver: no message")
                    message = envelope.message
                    del envelope
                float(message.h[-1])  # the tensor is usable
                del message  # done with it: free its frames before the next receive, as raw does
            conn.send(time.process_time() - cpu)
    raw.close()
    context.term()


@dataclass(frozen=True)
class Trial:
    msgs_per_s: float  # from the first send until the receiver has every message
    sender_cpu_us: float  # per message, all threads of the process
    receiver_cpu_us: float

    @property
    def cpu_us_per_msg(self) -> float:
        return self.sender_cpu_us + self.receiver_cpu_us


def _trial(conn: Connection, mode: str, count: int, send: Callable[[int], object]) -> Trial:
    conn.send((mode, count))
    start, cpu = time.perf_counter(), time.process_time()
    for seq in range(count):
        send(seq)
    if not conn.poll(WAIT_MS / 1000):
        raise TimeoutError(f"{mode} receiver did not finish")
    receiver_cpu = conn.recv()
    wall, sender_cpu = time.perf_counter() - start, time.process_time() - cpu
    return Trial(count / wall, sender_cpu / count * 1e6, receiver_cpu / count * 1e6)


def _hot_us(call: Callable[[], object], seconds: float = 0.3) -> float:
    """Best per-call time of `call` repeated in a tight loop in this process."""
    number = max(1, int(seconds / 5 / max(timeit.timeit(call, number=100) / 100, 1e-9)))
    return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6


def _paths(size: int, raw: zmq.Socket, peers: dict[str, Peer],
           breakdown: bool) -> dict[str, Callable[[int], object]]:
    tensor = torch.ones(size // 4)
    payload = memoryview(tensor.numpy()).cast("B")
    paths: dict[str, Callable[[int], object]] = {
        "raw": lambda seq: raw.send_multipart([RAW_HEADER, payload], copy=False),
        **{mode: lambda seq, peer=peer: peer.send(wire.Activation("bench", seq, tensor))
           for mode, peer in peers.items()},
    }
    if breakdown:
        encoded = wire.encode(wire.Activation("bench", 0, tensor))
        paths["encode"] = lambda seq: raw.send_multipart(wire.encode(wire.Activation("bench", seq, tensor)),
                                                         copy=False)
        paths["decode"] = lambda seq: raw.send_multipart(encoded, copy=False)
    return paths


def _median(trials: list[dict[str, Trial]], mode: str, metric: str) -> float:
    return statistics.median(getattr(t[mode], metric) for t in trials)


def _row(size: int, trials: list[dict[str, Trial]]) -> dict[str, float]:
    row: dict[str, float] = {"size_bytes": size}
    for mode in ("raw", "mesh", "curve"):
        if mode in trials[0]:
            rate = _median(trials, mode, "msgs_per_s")
            row.update({f"{mode}_msgs_per_s": rate, f"{mode}_gbps": rate * size / 1e9,
                        f"{mode}_cpu_us_per_msg": _median(trials, mode, "cpu_us_per_msg")})
    row["ratio"] = statistics.median(t["mesh"].msgs_per_s / t["raw"].msgs_per_s for t in trials)
    row["cpu_ratio"] = statistics.median(t["raw"].cpu_us_per_msg / t["mesh"].cpu_us_per_msg for t in trials)
    if "curve" in trials[0]:  # CURVE against the plain mesh path, trial by trial
        row["curve_ratio"] = statistics.median(t["curve"].msgs_per_s / t["mesh"].msgs_per_s for t in trials)
        row["curve_cpu_ratio"] = statistics.median(t["mesh"].cpu_us_per_msg / t["curve"].cpu_us_per_msg
                                                   for t in trials)
    return row


def _breakdown(size: int, trials: list[dict[str, Trial]]) -> dict[str, object]:
    """What each end's codec adds per message in the stream, next to its cost in a hot loop."""
    tensor = torch.ones(size // 4)
    encoded = wire.encode(wire.Activation("bench", 0, tensor))
    received = [bytes(frame) for frame in encoded]  # copied on decode, as small zmq frames are
    hot = {
        "encode": _hot_us(lambda: wire.encode(wire.Activation("bench", 1, tensor))),
        "decode": _hot_us(lambda: float(wire.decode(received).h[-1])),
    }
    metrics = ("msgs_per_s", "sender_cpu_us", "receiver_cpu_us")
    paths = {mode: {metric: _median(trials, mode, metric) for metric in metrics}
             for mode in ("raw", "encode", "decode", "mesh")}
    added = {
        "encode": paths["encode"]["sender_cpu_us"] - paths["raw"]["sender_cpu_us"],
        "decode": paths["decode"]["receiver_cpu_us"] - paths["raw"]["receiver_cpu_us"],
    }
    return {"size_bytes": size, "paths": paths, "hot_loop_us": hot, "in_stream_us": added}


@contextlib.contextmanager
def _peers(context: zmq.Context, inbox_address: str, curve_address: str | None,
           keys: Path | None) -> Iterator[dict[str, Peer]]:
    with contextlib.ExitStack() as stack:
        peers = {"mesh": stack.enter_context(Peer(inbox_address, "sender", CONFIG, context))}
        if keys is not None:
            peers["curve"] = stack.enter_context(Peer(curve_address, "sender", _curve_config(keys, "sender", ()),
                                                      context, server="receiver"))
        yield peers


def measure(sizes: tuple[int, ...], repeats: int, seconds: float, breakdown: bool = False,
            curve: bool = False) -> tuple[list[dict[str, float]], dict[str, object] | None]:
    with tempfile.TemporaryDirectory(prefix="bench-keys-") as folder:
        keys = Path(folder) / "keys" if curve else None
        if keys is not None:
            create_keys(keys, ["sender", "receiver"])
        return _measure(sizes, repeats, seconds, breakdown, keys)


def _measure(sizes: tuple[int, ...], repeats: int, seconds: float, breakdown: bool,
             keys: Path | None) -> tuple[list[dict[str, float]], dict[str, object] | None]:
    spawn = multiprocessing.get_context("spawn")
    conn, child_conn = spawn.Pipe()
    child = spawn.Process(target=_receiver, args=(child_conn, keys), daemon=True)
    child.start()
    if not conn.poll(WAIT_MS / 1000):
        raise TimeoutError("receiver did not start")
    raw_address, inbox_address, curve_address = conn.recv()
    context = zmq.Context()
    raw = _raw_socket(context, zmq.DEALER)
    raw.connect(raw_address)
    rows, parts = [], None
    with _peers(context, inbox_address, curve_address, keys) as peers:
        for size in sizes:
            split = breakdown and size == BREAKDOWN_SIZE
            paths = _paths(size, raw, peers, split)
            warmup = max(20, (64 << 20) // size)
            warm = {mode: _trial(conn, mode, warmup, send) for mode, send in paths.items()}
            count = max(20, int(warm["raw"].msgs_per_s * seconds))
            trials = []
            for repeat in range(repeats):  # alternate the order of the paths, against drift in load
                order = sorted(paths, reverse=repeat % 2 == 1)
                trials.append({mode: _trial(conn, mode, count, paths[mode]) for mode in order})
            rows.append(_row(size, trials))
            print(_format(rows[-1]), flush=True)
            if split:
                parts = _breakdown(size, trials)
    conn.send(None)
    child.join(WAIT_MS / 1000)
    raw.close(linger=0)
    context.term()
    return rows, parts


def machine() -> dict[str, object]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.is_available(),
        "loadavg_1m": os.getloadavg()[0],
    }


HEADER = (f"{'size':>8} {'raw msg/s':>10} {'raw GB/s':>9} {'mesh msg/s':>11} {'mesh GB/s':>10} {'ratio':>6}"
          f" {'raw CPU us':>11} {'mesh CPU us':>12} {'cpu ratio':>10}")


CURVE_HEADER = (f"{'size':>8} {'plain GB/s':>11} {'CURVE GB/s':>11} {'CURVE/plain':>12} {'plain CPU us':>13}"
                f" {'CURVE CPU us':>13} {'cpu ratio':>10}")


def _label(size: int) -> str:
    return f"{size >> 20} MB" if size >= 1 << 20 else f"{size >> 10} KB"


def _format(row: dict[str, float]) -> str:
    return (f"{_label(row['size_bytes']):>8} {row['raw_msgs_per_s']:>10.0f} {row['raw_gbps']:>9.2f} "
            f"{row['mesh_msgs_per_s']:>11.0f} {row['mesh_gbps']:>10.2f} {row['ratio']:>6.2f} "
            f"{row['raw_cpu_us_per_msg']:>11.0f} {row['mesh_cpu_us_per_msg']:>12.0f} {row['cpu_ratio']:>10.2f}")


def _format_curve(row: dict[str, float]) -> str:
    """The plain mesh path against CURVE, measured side by side in the same trials."""
    return (f"{_label(row['size_bytes']):>8} {row['mesh_gbps']:>11.2f} {row['curve_gbps']:>11.2f} "
            f"{row['curve_ratio']:>12.2f} {row['mesh_cpu_us_per_msg']:>13.0f} {row['curve_cpu_us_per_msg']:>13.0f}"
            f" {row['curve_cpu_ratio']:>10.2f}")


def _format_breakdown(parts: dict[str, object]) -> str:
    lines = [f"\nbreakdown at {parts['size_bytes'] >> 10} KB (medians): CPU per message, all threads of each process",
             f"{'path':>8} {'msg/s':>8} {'sender us':>10} {'receiver us':>12}"]
    for mode, row in parts["paths"].items():
        lines.append(f"{mode:>8} {row['msgs_per_s']:>8.0f} {row['sender_cpu_us']:>10.1f}"
                     f" {row['receiver_cpu_us']:>12.1f}")
    for end in ("encode", "decode"):
        hot, stream = parts["hot_loop_us"][end], parts["in_stream_us"][end]
        lines.append(f"{end}: {hot:.1f} us in a hot loop, adds {stream:.1f} us to its process in the stream "
                     f"({stream / hot:.1f}x)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="also write the rows and the machine as JSON")
    parser.add_argument("--repeats", type=int, default=5, help="trials per size and path (median)")
    parser.add_argument("--seconds", type=float, default=1.0, help="about how long one raw trial runs")
    parser.add_argument("--breakdown", action="store_true",
                        help=f"at {BREAKDOWN_SIZE >> 10} KB also split the codec's cost between the two ends")
    parser.add_argument("--curve", action="store_true",
                        help="also measure the mesh path with CURVE, beside the plain one")
    args = parser.parse_args()
    print(HEADER, flush=True)
    rows, parts = measure(SIZES, args.repeats, args.seconds, args.breakdown, args.curve)
    if parts is not None:
        print(_format_breakdown(parts), flush=True)
    if args.curve:
        print(f"\nCURVE against plain (medians; ratios per trial)\n{CURVE_HEADER}", flush=True)
        for row in rows:
            print(_format_curve(row), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            result: dict[str, object] = {"rows": rows, "machine": machine()}
            if parts is not None:
                result["breakdown"] = parts
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
