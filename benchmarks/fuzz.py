"""Fuzz a training mesh: hostile messages at every node inbox while it trains, against its twin.

    python -m benchmarks.fuzz [--messages 100000] [--json benchmarks/results/fuzz.json]
        [--epochs N] [--limit BATCHES] [--connections K] [--data-dir DIR]

What it measures (issue 10's fuzz target). The same MNIST training mesh (source -> three FC-256
+ batch norm + ReLU stages -> classifier head, cDNI, batch 256, window 1, so a run is
deterministic) runs twice through `dni-mesh run`: first left alone, then while this script, from
outside and with nothing but raw pyzmq DEALER sockets, sends `--messages` hostile messages spread
over every node's inbox from several connections per inbox. It reports:

- messages sent per class, and per node the counter each must land in;
- each run's exit status (must be 0), wall time and test accuracy (must be identical: a
  hostile message that were taken would change the deterministic run);
- each node's peak RSS in both runs (the fuzzed within 10% of the unfuzzed);
- each node's bad_messages / unexpected / rejected counts, against what was sent there;
- when the fuzzing started and ended, in head training steps, so it is visible that the
  messages landed while the mesh trained (raise --epochs/--limit if they did not).

Classes. Malformed (the node's codec must drop and count them as bad_messages): `deep_nesting`
(the 1001-byte frame holding a msgpack array nested 1000 deep, and other depths, arrays and
maps), `random_bytes`, `bad_lengths` (nbytes or frame lengths that disagree, missing and extra
frames), `huge_shapes` (claimed sizes over the limits, too many dims), `wrong_versions`,
`duplicate_keys` (a header map naming a key twice; the spec says reject), `header_limits`
(oversized header, too many frames). Well-formed but forged, from strangers and from real node
names that are not the target's neighbours (the node's core must drop and count them as
rejected): `forged_act` (unknown seq, unknown edge, the right edge and seq from the wrong
identity, wrong shapes and dtypes, labels out of range, at the real activation size),
`forged_grad` (seqs not in flight, wrong shapes, bare credits), `forged_end` (wrong counts, the
right count from the wrong identity). Counted as unexpected: `forged_stop` (only the launcher
may stop a node, over its own control connection) and `other_kinds` (hello, ready, heartbeat,
metrics, error, end_ack). `impostor`: forged messages over a connection that carries a real
neighbour's routing id, made after that neighbour connected, beside a silent one per neighbour;
the transport ignores a second connection with a name, so these are never delivered or counted.
`oversized`: frames just over, twice and far over the largest tensor the node can legitimately
be sent, which each node sets as its inbox's MAXMSGSIZE: libzmq refuses each before allocating
it and drops the connection, so they are not counted either; they go on connections of their
own, so that no counted message is lost with them. Every other class keeps its frames within
that bound, so each of its messages must be counted exactly where the class says.

Impostor and oversized connections take few messages (an ignored connection fills its queue
and stays full; a cut one redials first), so nearly all of `--messages` are of the counted
classes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import torch
import yaml
import zmq

from dni_mesh import wire
from dni_mesh.topology import Topology, load_topology
from dni_mesh.transport import free_port_range

BAD, UNEXPECTED, REJECTED = "bad_messages", "unexpected", "rejected"
IGNORED = "ignored"  # sent on an impostor's connection, which the inbox never reads
CUT = "cut"          # a frame over the node's MAXMSGSIZE: libzmq drops it and the connection
COUNTERS = (BAD, UNEXPECTED, REJECTED)
WIDTH = 256
BATCH = 256
DEEP = b"\x91" * 1000 + b"\xc0"  # the 1001-byte frame that killed nodes with RecursionError
HEADER_LIMIT = wire.DEFAULT_LIMITS.max_header_bytes


def topology(name: str, data_dir: str, epochs: int, limit: int, port: int) -> dict:
    """The paper's MNIST FCN as a five-process mesh, locked to window 1 (deterministic)."""
    return {
        "name": name, "mode": "cdni", "seed": 0,
        "data": {"source": "mnist", "batch_size": BATCH, "epochs": epochs, "limit": limit,
                 "eval_every": 0, "data_dir": data_dir},
        "defaults": {"optimizer": {"name": "adam", "lr": 1.0e-3}, "window": 1,
                     "synthetic_gradient": {"hidden": 0, "optimizer": {"name": "adam", "lr": 1.0e-5}}},
        "nodes": {"source": {"role": "source"},
                  "l1": {"module": "nodes.mlp:Block", "args": {"d_in": 784, "d_out": WIDTH}},
                  "l2": {"module": "nodes.mlp:Block", "args": {"d_in": WIDTH, "d_out": WIDTH}},
                  "l3": {"module": "nodes.mlp:Block", "args": {"d_in": WIDTH, "d_out": WIDTH}},
                  "head": {"role": "head", "module": "nodes.mlp:Classifier",
                           "args": {"d_in": WIDTH, "classes": 10}}},
        "edges": ["source -> l1", "l1 -> l2", "l2 -> l3", "l3 -> head"],
        "hosts": {"local": {"address": "127.0.0.1", "base_port": port}},
    }


FEATURES = {"source": (784,), "l1": (WIDTH,), "l2": (WIDTH,), "l3": (WIDTH,)}


# Message pools: per (node, class) a list of (frames, counter), drawn from in turn.

def frames(message: wire.Message) -> list[bytes]:
    return [bytes(f) for f in wire.encode(message)]


def raw_map(pairs: list[tuple[object, object]]) -> bytes:
    """A msgpack map written pair by pair, so that a key can appear twice."""
    n = len(pairs)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")
    return head + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in pairs)


@dataclass
class Target:
    """What the fuzzer knows of one node: its edges, and a forgery of each kind of its traffic."""
    node: str
    address: str
    in_edge: str
    in_shape: tuple[int, ...]
    out_edge: str
    out_shape: tuple[int, ...]
    neighbours: list[str]
    strangers: list[str]  # real node names that are not its neighbours
    bound: int            # the largest frame its inbox takes (bigger ones cut the connection)


def receive_bound(top: Topology, node: str) -> int:
    """The largest tensor a node can legitimately be sent (a batch of its inputs, or of the
    gradient of its output; float32 here), and never under 64 KiB: a node sets its inbox's
    MAXMSGSIZE to this, so every frame of the classes that must be counted stays within it."""
    sizes = [64 * 1024, 8 * BATCH]
    sizes += [BATCH * math.prod(FEATURES[e.src]) * 4 for e in top.inputs(node)]
    if top.outputs(node):
        sizes.append(BATCH * math.prod(FEATURES[node]) * 4)
    return max(sizes)


def targets(top: Topology) -> list[Target]:
    out = []
    for node, spec in top.nodes.items():
        ins, outs = top.inputs(node), top.outputs(node)
        neighbours = sorted({e.src for e in ins} | {e.dst for e in outs})
        out.append(Target(
            node, spec.address,
            ins[0].name if ins else f"ghost->{node}",
            FEATURES[ins[0].src] if ins else (WIDTH,),
            outs[0].name if outs else f"{node}->ghost",
            FEATURES[node] if outs else (WIDTH,),
            neighbours, [n for n in top.nodes if n != node and n not in neighbours],
            receive_bound(top, node)))
    return out


def pool_deep_nesting(t: Target, rng: random.Random, total: int) -> list:
    pool = [([DEEP], BAD), ([b"\x81\xa1k" * 1000 + b"\xc0"], BAD),
            ([b"\x91" * (HEADER_LIMIT - 1) + b"\xc0"], BAD)]
    for _ in range(13):
        depth = rng.choice([100, 500, 999, 1001, 2000, 5000, 20000, HEADER_LIMIT // 3])
        unit = rng.choice([b"\x91", b"\xdc\x00\x01", b"\x81\xa1k", b"\x92\xc0"])
        pool.append(([unit * depth + b"\xc0"], BAD))
    return pool


def pool_random_bytes(t: Target, rng: random.Random, total: int) -> list:
    return [([rng.randbytes(rng.choice([0, 1, 7, 64, 300, 2048])) for _ in range(rng.randint(1, 4))], BAD)
            for _ in range(32)]


def valid_act(t: Target, seq: int = 0) -> list[bytes]:
    return frames(wire.Activation(t.in_edge, seq, torch.zeros(4, *t.in_shape),
                                  torch.zeros(4, dtype=torch.int64)))


def pool_bad_lengths(t: Target, rng: random.Random, total: int) -> list:
    header, h, labels = valid_act(t)
    pool = [([header, h[:-1], labels], BAD), ([header, h + b"\0", labels], BAD),
            ([header, h], BAD), ([header, h, labels, b"x"], BAD), ([header[:-3], h, labels], BAD),
            ([header, labels, h], BAD), ([header, b"", labels], BAD)]
    meta = msgpack.unpackb(header)
    for delta in (-4, 4, 1 << 20):
        m = dict(meta, tensors=[dict(meta["tensors"][0], nbytes=meta["tensors"][0]["nbytes"] + delta),
                                meta["tensors"][1]])
        pool.append(([msgpack.packb(m), h, labels], BAD))
    return pool


def pool_huge_shapes(t: Target, rng: random.Random, total: int) -> list:
    header, h, labels = valid_act(t)
    meta = msgpack.unpackb(header)
    pool = []
    for shape in ([2**31, 2**31], [2**62, 4], [1 << 28, 784], [0, 2**40, 2**40], [1] * 9,
                  [-1, 784], [4, 2**63], [2**64 - 1, 1]):
        nbytes = max(0, math.prod(shape)) * 4 if all(isinstance(d, int) and d >= 0 for d in shape) else 16
        desc = dict(meta["tensors"][0], shape=shape, nbytes=min(nbytes, 2**64 - 1))
        pool.append(([msgpack.packb(dict(meta, tensors=[desc, meta["tensors"][1]])), h, labels], BAD))
    return pool


def pool_wrong_versions(t: Target, rng: random.Random, total: int) -> list:
    header, h, labels = valid_act(t)
    meta = msgpack.unpackb(header)
    pool = [([msgpack.packb(dict(meta, v=v)), h, labels], BAD)
            for v in (0, 2, 255, -1, 2**40, "1", 1.0, True, None, [1])]
    pool.append(([msgpack.packb({k: v for k, v in meta.items() if k != "v"}), h, labels], BAD))
    stop = msgpack.unpackb(frames(wire.Stop(t.node, "x"))[0])
    pool += [([msgpack.packb(dict(stop, v=v))], BAD) for v in (0, 2)]
    return pool


def pool_duplicate_keys(t: Target, rng: random.Random, total: int) -> list:
    stop = [("v", 1), ("kind", "stop"), ("node", t.node), ("reason", "dup"), ("tensors", [])]
    end = [("v", 1), ("kind", "end"), ("edge", t.in_edge), ("seq", total), ("tensors", [])]
    pool = []
    for base in (stop, end):
        for i in range(len(base)):
            pool.append(([raw_map(base[:i + 1] + base[i:])], BAD))  # key i twice, same value
        pool.append(([raw_map([("v", 2)] + base)], BAD))             # first value invalid
        pool.append(([raw_map(base + [("v", 2)])], BAD))             # last value invalid
    return pool


def pool_header_limits(t: Target, rng: random.Random, total: int) -> list:
    big = msgpack.packb({"v": 1, "kind": "stop", "node": "x" * HEADER_LIMIT, "reason": "", "tensors": []})
    header, h, labels = valid_act(t)
    return [([big], BAD), ([b"\xda" + b"\xff\xff" + b"a" * 65535], BAD),
            ([header, h, labels] + [b""] * 7, BAD), ([b""] * 12, BAD), ([b""], BAD)]


def pool_forged_act(t: Target, rng: random.Random, total: int) -> list:
    x = torch.zeros(BATCH, *t.in_shape)  # the real activation size (l1: 256 x 784 floats)
    y = torch.zeros(BATCH, dtype=torch.int64)
    half = BATCH // 2  # float64 at half the batch: the real size in bytes
    return [(frames(m), REJECTED) for m in (
        wire.Activation(t.in_edge, 10**9, x, y),                     # unknown seq
        wire.Activation(t.in_edge, 1, x, y),                         # in a window, wrong sender
        wire.Activation(t.in_edge, 0, x, y, "eval"),
        wire.Activation(f"ghost->{t.node}", 0, x, y),                # no such edge
        wire.Activation(t.in_edge, 0, torch.zeros(BATCH, 7), y),     # wrong shape
        wire.Activation(t.in_edge, 0, x[:half].double(), y[:half]),  # wrong dtype
        wire.Activation(t.in_edge, 0, x, torch.full((BATCH,), 10)),  # labels out of range
        wire.Activation(t.in_edge, 0, x, torch.full((BATCH,), -5)),
        wire.Activation(t.in_edge, 0, x),                            # train without labels
        wire.Activation(t.in_edge, 0, x[:1, :3], y[:1]),             # a tiny one
    )]


def pool_forged_grad(t: Target, rng: random.Random, total: int) -> list:
    dh = torch.zeros(BATCH, *t.out_shape)
    return [(frames(m), REJECTED) for m in (
        wire.Gradient(t.out_edge, 0, dh), wire.Gradient(t.out_edge, 10**9, dh),
        wire.Gradient(t.out_edge, 1, torch.zeros(BATCH, 3)), wire.Gradient(t.out_edge, 2),
        wire.Gradient(t.out_edge, 3, torch.zeros(BATCH, *t.out_shape, dtype=torch.int32)),
        wire.Gradient("ghost", 0, dh), wire.Gradient(t.in_edge, 0, dh),
    )]


def pool_forged_end(t: Target, rng: random.Random, total: int) -> list:
    return [(frames(wire.End(edge, count)), REJECTED)
            for edge in (t.in_edge, t.out_edge, "ghost")
            for count in (0, 1, total - 1, total, total + 1, 10**15)]


def pool_forged_stop(t: Target, rng: random.Random, total: int) -> list:
    return [(frames(wire.Stop(who, reason)), UNEXPECTED)
            for who in (t.node, "launcher", "")
            for reason in ("forged stop", "launcher: Interrupted", "x" * 1000)]


def pool_other_kinds(t: Target, rng: random.Random, total: int) -> list:
    return [(frames(m), UNEXPECTED) for m in (
        wire.Hello(t.node, 1, "evil", "tcp://127.0.0.1:1"), wire.Ready(t.node),
        wire.Heartbeat(t.node, 10**9, time.time()),
        wire.Metrics(t.node, 0, {"event": "final", "status": "done", "steps": 0}),
        wire.Error(t.node, "forged error"), wire.EndAck(t.in_edge, total),
        wire.EndAck(t.out_edge, total))]


def pool_oversized(t: Target, rng: random.Random, total: int) -> list:
    """Frames over the node's bound, sent on connections of their own: the inbox's libzmq
    refuses each before allocating it and drops that connection (which then redials)."""
    rows = t.bound // (4 * math.prod(t.in_shape)) + 1
    parts = [frames(wire.Activation(t.in_edge, 0, torch.zeros(rows, *t.in_shape),
                                    torch.zeros(rows, dtype=torch.int64)))]
    for size in (t.bound + 1, 2 * t.bound, 16 << 20):
        h = {"name": "h", "dtype": "uint8", "shape": [size], "nbytes": size}
        header = msgpack.packb({"v": 1, "kind": "act", "edge": t.in_edge, "seq": 0,
                                "phase": "train", "tensors": [h]})
        parts.append([header, bytes(size)])
    parts.append([b"\x91" * (t.bound + 1)])  # an oversized header frame
    return [(p, CUT) for p in parts]


def pool_impostor(t: Target, rng: random.Random, total: int) -> list:
    msgs = pool_forged_stop(t, rng, total)[:3] + pool_forged_end(t, rng, total)[:6]
    msgs += pool_forged_act(t, rng, total)[:3] + pool_forged_grad(t, rng, total)[:3] + [([DEEP], BAD)]
    return [(parts, IGNORED) for parts, _ in msgs]


CLASSES: dict[str, Callable[[Target, random.Random, int], list]] = {
    "deep_nesting": pool_deep_nesting, "random_bytes": pool_random_bytes,
    "bad_lengths": pool_bad_lengths, "huge_shapes": pool_huge_shapes,
    "wrong_versions": pool_wrong_versions, "duplicate_keys": pool_duplicate_keys,
    "header_limits": pool_header_limits, "forged_act": pool_forged_act,
    "forged_grad": pool_forged_grad, "forged_end": pool_forged_end,
    "forged_stop": pool_forged_stop, "other_kinds": pool_other_kinds, "impostor": pool_impostor,
    "oversized": pool_oversized,
}


# Sockets.

def dealer(context: zmq.Context, address: str, identity: bytes, hwm: int = 16) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RECONNECT_IVL, 50)
    sock.connect(address)
    return sock


@dataclass
class Lane:
    """One (node, class) stream: its connections, taken in turn, and its pool of messages."""
    node: str
    cls: str
    sockets: list[zmq.Socket]
    pool: list[tuple[list[bytes], str]]
    next: int = 0


@dataclass
class FuzzReport:
    sent_per_class: Counter = field(default_factory=Counter)
    expected: dict[str, Counter] = field(default_factory=dict)  # node -> counter -> messages
    connections: int = 0
    silent_impostors: int = 0
    started_step: int = 0
    finished_step: int = 0
    seconds: float = 0.0
    waits: int = 0  # times every connection was full and the fuzzer waited for room


def head_steps(run_dir: Path) -> int:
    path = run_dir / "head.jsonl"
    if not path.exists():
        return 0
    return path.read_text().count('"event": "step"')


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)  # polling a file the mesh writes


def fuzz(top: Topology, run_dir: Path, process: subprocess.Popen, messages: int,
         connections: int, seed: int, context: zmq.Context, keep: list[zmq.Socket]) -> FuzzReport:
    """Send `messages` hostile messages over every inbox of the running mesh; the sockets stay
    open (in `keep`) until the run ends, so that nothing still queued is lost."""
    report = FuzzReport()
    rng = random.Random(seed)
    total = top.data.limit * top.data.epochs  # roughly what an End would count
    pools = {(t.node, cls): make(t, random.Random(rng.random()), total)
             for t in targets(top) for cls, make in CLASSES.items()}
    # Wait until every edge carries traffic: then each neighbour's connection holds its name,
    # and an impostor's is the second one.
    wait_for(lambda: head_steps(run_dir) >= 2 or process.poll() is not None, 300, "the mesh to train")
    lanes: list[Lane] = []
    for t in targets(top):
        report.expected[t.node] = Counter()
        strangers = [dealer(context, t.address, f"fuzz-{t.node}-{i}".encode()) for i in range(connections)]
        wrong = [dealer(context, t.address, name.encode()) for name in t.strangers]
        impostors = [dealer(context, t.address, name.encode()) for name in t.neighbours]
        silent = [dealer(context, t.address, name.encode()) for name in t.neighbours]
        oversized = [dealer(context, t.address, f"fuzz-{t.node}-big-{i}".encode()) for i in range(2)]
        keep += strangers + wrong + impostors + silent + oversized
        report.connections += len(strangers + wrong + impostors + silent + oversized)
        report.silent_impostors += len(silent)
        for cls in CLASSES:
            if cls == "impostor":
                socks = impostors
            elif cls == "oversized":
                socks = oversized
            elif cls.startswith("forged") or cls == "other_kinds":
                socks = strangers + wrong
            else:
                socks = strangers
            pool = pools[t.node, cls]
            rng.shuffle(pool)
            lanes.append(Lane(t.node, cls, socks, pool))
    rng.shuffle(lanes)
    report.started_step = head_steps(run_dir)
    started = time.monotonic()
    poller = zmq.Poller()
    for sock in {id(s): s for lane in lanes for s in lane.sockets}.values():
        poller.register(sock, zmq.POLLOUT)
    sent, i = 0, 0
    blocked_in_a_row = 0
    while sent < messages:
        if process.poll() is not None:
            break
        lane = lanes[i % len(lanes)]
        i += 1
        parts, counter = lane.pool[lane.next % len(lane.pool)]
        sock = lane.sockets[lane.next % len(lane.sockets)]
        try:
            sock.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:  # that inbox is not taking this connection's messages right now
            blocked_in_a_row += 1
            if blocked_in_a_row >= len(lanes):
                report.waits += 1
                poller.poll(50)
                blocked_in_a_row = 0
            continue
        blocked_in_a_row = 0
        lane.next += 1
        sent += 1
        report.sent_per_class[lane.cls] += 1
        report.expected[lane.node][counter] += 1
    report.seconds = time.monotonic() - started
    report.finished_step = head_steps(run_dir)
    return report


# Runs.

def start(folder: Path, top_dict: dict) -> tuple[Path, Path, subprocess.Popen, float]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mesh.yaml"
    path.write_text(yaml.safe_dump(top_dict, sort_keys=False))
    run_dir = folder / "run"
    with (folder / "launcher.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dni_mesh.cli", "run", str(path), "--run-dir", str(run_dir),
             "--summary", str(folder / "summary.json"), "--no-live"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return path, run_dir, process, time.monotonic()


def finish(folder: Path, process: subprocess.Popen, started: float, timeout: float) -> dict:
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        code = process.wait()
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    log = (folder / "launcher.log").read_text(errors="replace")
    return {"exit_code": code, "wall_s": round(time.monotonic() - started, 2),
            "test_accuracy": summary.get("test_accuracy"), "summary": summary,
            "launcher_log_tail": log[-2000:] if code else ""}


def head_losses(run_dir: Path) -> list[float]:
    path = run_dir / "head.jsonl"
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines())
            if r.get("event") == "step"] if path.exists() else []


def markdown(result: dict) -> str:
    un, fz = result["unfuzzed"], result["fuzzed"]
    lines = [
        f"Fuzzed mesh: {result['messages_sent']:,} hostile messages ({result['messages_target']:,} "
        f"asked) over {result['connections']} connections to {len(result['nodes'])} inboxes, "
        f"in {result['fuzz_seconds']:.1f} s, between head training steps "
        f"{result['fuzz_started_step']} and {result['fuzz_finished_step']} of {result['train_steps']}.",
        "",
        "| run | exit | test accuracy | wall s |",
        "|---|---|---|---|",
        f"| unfuzzed | {un['exit_code']} | {un['test_accuracy']} | {un['wall_s']} |",
        f"| fuzzed | {fz['exit_code']} | {fz['test_accuracy']} | {fz['wall_s']} |",
        "",
        "| class | sent |", "|---|---|",
        *(f"| {cls} | {n:,} |" for cls, n in result["sent_per_class"].items()),
        "",
        "| node | max RSS MB unfuzzed | fuzzed | ratio | bad sent / counted | unexpected sent / counted "
        "| rejected sent / counted | to impostors (never read) | oversized (connection cut) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for node, row in result["nodes"].items():
        e, c = row["expected"], row["counted"]
        lines.append(
            f"| {node} | {row['rss_unfuzzed_mb']} | {row['rss_fuzzed_mb']} | {row['rss_ratio']:.3f} | "
            f"{e[BAD]:,} / {c[BAD]:,} | {e[UNEXPECTED]:,} / {c[UNEXPECTED]:,} | "
            f"{e[REJECTED]:,} / {c[REJECTED]:,} | {e[IGNORED]:,} | {e[CUT]:,} |")
    lines += ["", "| check | result |", "|---|---|",
              *(f"| {name} | {'pass' if ok else 'FAIL'} |" for name, ok in result["checks"].items())]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=100_000, help="hostile messages to send (default 100000)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of both runs (default 3)")
    p.add_argument("--limit", type=int, default=234,
                   help="training batches of 256 per epoch (default 234: all of MNIST's full ones)")
    p.add_argument("--connections", type=int, default=3,
                   help="stranger connections per inbox, beside one per real non-neighbour name "
                        "and two impostors per neighbour (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fuzzer's choices")
    p.add_argument("--data-dir", default=os.environ.get("DNI_MESH_DATA"),
                   help="folder holding mnist/ (default: env DNI_MESH_DATA)")
    p.add_argument("--run-dir", type=Path, help="keep both runs here (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds each run may take")
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data_dir:
        print("benchmarks.fuzz: give --data-dir or set DNI_MESH_DATA (the folder holding mnist/)",
              file=sys.stderr)
        return 2
    began = time.monotonic()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dni-fuzz-") as scratch:
        root = args.run_dir or Path(scratch)
        base = free_port_range(16)
        settings = dict(data_dir=str(Path(args.data_dir).resolve()), epochs=args.epochs, limit=args.limit)

        # 1. Unfuzzed.
        folder = root / "unfuzzed"
        _, run_dir_u, process, started = start(folder, topology("fuzz-mnist", port=base, **settings))
        unfuzzed = finish(folder, process, started, args.timeout)
        print(f"unfuzzed: exit {unfuzzed['exit_code']}, accuracy {unfuzzed['test_accuracy']}, "
              f"{unfuzzed['wall_s']} s", flush=True)

        # 2. Fuzzed.
        folder = root / "fuzzed"
        path, run_dir_f, process, started = start(folder, topology("fuzz-mnist", port=base + 8, **settings))
        context = zmq.Context()
        keep: list[zmq.Socket] = []
        try:
            top = load_topology(path)
            bounds = {t.node: t.bound for t in targets(top)}
            report = fuzz(top, run_dir_f, process, args.messages, args.connections,
                          args.seed, context, keep)
            print(f"fuzzer: sent {sum(report.sent_per_class.values()):,} messages in "
                  f"{report.seconds:.1f} s (head steps {report.started_step} -> {report.finished_step})",
                  flush=True)
            fuzzed = finish(folder, process, started, args.timeout)
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait()
            for sock in keep:
                sock.close(linger=0)
            context.term()
        print(f"fuzzed: exit {fuzzed['exit_code']}, accuracy {fuzzed['test_accuracy']}, "
              f"{fuzzed['wall_s']} s", flush=True)
        same_losses = head_losses(run_dir_u) == head_losses(run_dir_f) and bool(head_losses(run_dir_u))

    nodes = {}
    un_nodes = unfuzzed["summary"].get("nodes", {})
    fz_nodes = fuzzed["summary"].get("nodes", {})
    for node in report.expected:
        u, f = un_nodes.get(node, {}), fz_nodes.get(node, {})
        ru, rf = u.get("max_rss_mb"), f.get("max_rss_mb")
        expected = report.expected[node]
        nodes[node] = {
            "steps_unfuzzed": u.get("steps"), "steps_fuzzed": f.get("steps"),
            "eval_batches_unfuzzed": u.get("eval_batches"), "eval_batches_fuzzed": f.get("eval_batches"),
            "rss_unfuzzed_mb": ru, "rss_fuzzed_mb": rf,
            "rss_ratio": rf / ru if ru and rf else float("nan"),
            "expected": {k: expected[k] for k in (*COUNTERS, IGNORED, CUT)},
            "receive_bound_bytes": bounds[node],
            "counted": {k: f.get(k) for k in COUNTERS},
            "unfuzzed_counted": {k: u.get(k) for k in COUNTERS},
            "dropped_messages": [u.get("dropped_messages"), f.get("dropped_messages")],
        }
    train_steps = args.epochs * args.limit
    checks = {
        "both runs exit 0": unfuzzed["exit_code"] == 0 and fuzzed["exit_code"] == 0,
        "test accuracy identical": unfuzzed["test_accuracy"] is not None
                                   and unfuzzed["test_accuracy"] == fuzzed["test_accuracy"],
        "head losses identical, step by step": same_losses,
        "every node made every step": all(n["steps_unfuzzed"] == n["steps_fuzzed"] is not None
                                          and n["eval_batches_unfuzzed"] == n["eval_batches_fuzzed"]
                                          for n in nodes.values()),
        f"at least {args.messages:,} messages sent": sum(report.sent_per_class.values()) >= args.messages,
        "every message counted where it belongs": all(
            n["counted"] == {k: n["expected"][k] for k in COUNTERS} for n in nodes.values()),
        "fuzzing ended before training did": report.finished_step < train_steps,
        "max RSS within 10%": all(abs(n["rss_ratio"] - 1) <= 0.10 for n in nodes.values()),
    }
    result = {
        "command": ["python", "-m", "benchmarks.fuzz", *(argv if argv is not None else sys.argv[1:])],
        "messages_target": args.messages, "messages_sent": sum(report.sent_per_class.values()),
        "connections": report.connections, "silent_impostor_connections": report.silent_impostors,
        "fuzz_seconds": round(report.seconds, 2), "fuzz_waits": report.waits,
        "fuzz_started_step": report.started_step, "fuzz_finished_step": report.finished_step,
        "train_steps": train_steps, "epochs": args.epochs, "limit": args.limit,
        "sent_per_class": {cls: report.sent_per_class[cls] for cls in CLASSES},
        "unfuzzed": {k: v for k, v in unfuzzed.items() if k != "summary"},
        "fuzzed": {k: v for k, v in fuzzed.items() if k != "summary"},
        "nodes": nodes, "checks": checks,
        "total_wall_s": round(time.monotonic() - began, 1),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "pyzmq": zmq.__version__,
                    "libzmq": zmq.zmq_version(),
                    # Other work on the machine shows in the wall times, not in the other figures.
                    "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
    }
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
