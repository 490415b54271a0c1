"""Hostile input against real node processes (issue 10): every message class that once crashed,
stopped, stalled or hijacked a node, sent exactly as an outsider would, from raw pyzmq DEALER
sockets written from protocols/wire-v1.md.

Two set-ups, each started once and shared by the tests that read it:

- `mesh`: a real training mesh (`dni-mesh run`: source -> l1 -> l2 -> head on MNIST, window 1)
  attacked from outside while it runs, and its unattacked twin run beside it (window 1 is
  deterministic, so the two must agree exactly). An outsider can claim any routing id but one
  already connected to that inbox, so here forged messages come from strangers and from real
  node names that are not the target's neighbours; impostors that take a neighbour's name
  connect once every edge of the mesh carries traffic. Each class has its own sender name, so
  the node logs (which name the sender of every dropped message, the first ten per sender)
  attribute every count to its class.
- `node_runs`: one real `dni-mesh node l2` process per attack class, all at once, whose
  neighbours l1 and head are played by the test over the real protocol. Here the forged messages
  come over the neighbours' own connections (the right identity), so they reach the core's
  checks of edge, seq, shapes, labels, counts and kinds. An unattacked twin gives the outputs
  (activations to head, gradients to l1) that every attacked process must match bit for bit.
  One more l2 runs with the mesh's CURVE keys (issue 14), attacked by impostors that take l1's
  name before l1 connects: with no key, with another mesh's key, and with head's key.

The file takes under a minute on two shared cores, most of it spent starting the node processes
of the two meshes, each of which imports torch; the single nodes are forked from the session's
fork server (conftest.py), all but the CURVE one, which is a script of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from dni_mesh import wire
from dni_mesh.forkserver import ForkedProcess, ForkServer, node_environment
from dni_mesh.security import LAUNCHER, Curve, create_keys, curve_for
from dni_mesh.topology import Topology, load_topology
from dni_mesh.transport import free_port_range

DATA = Path(os.environ.get("DNI_MESH_DATA", Path(__file__).parents[2] / "shared" / "data")).resolve()
pytestmark = pytest.mark.skipif(not (DATA / "mnist").is_dir(),
                                reason=f"MNIST not found under {DATA} (set DNI_MESH_DATA)")

BATCH = 64
WIDTH = 32
STEPS = 48                            # training batches of the mesh runs
EVAL_BATCHES = -(-10_000 // BATCH)    # the final pass over MNIST's test set
FEATURES = {"source": (784,), "l1": (WIDTH,), "l2": (WIDTH,)}  # per-sample output of each node

# The exact frame that killed a node with RecursionError: a msgpack array nested 1000 deep
# (1000 fixarray-of-one headers, then nil), 1001 bytes.
DEEP = b"\x91" * 1000 + b"\xc0"
# The same idea as maps ({"k": {"k": ...}}), and as deep as the header limit lets it be.
DEEP_MAP = b"\x81\xa1k" * 1000 + b"\xc0"
DEEP_MAX = b"\x91" * (64 * 1024 - 1) + b"\xc0"
assert len(DEEP) == 1001 and len(DEEP_MAX) == 64 * 1024

COUNTERS = ("bad_messages", "unexpected", "rejected")


# Topologies and processes.

_ports_taken: set[int] = set()


def base_port(count: int = 8) -> int:
    """A free port range that no other set-up of this file was handed (they run side by side)."""
    while True:
        start = free_port_range(count)
        if not _ports_taken & set(range(start, start + count)):
            _ports_taken.update(range(start, start + count))
            return start


def chain(name: str, steps: int = STEPS) -> dict:
    """source -> l1 -> l2 -> head on MNIST, one batch in flight: the runs are deterministic."""
    return {
        "name": name, "mode": "dni", "seed": 3,
        "data": {"source": "mnist", "batch_size": BATCH, "epochs": 1, "eval_every": 0,
                 "limit": steps, "data_dir": str(DATA)},
        "defaults": {"optimizer": {"name": "adam", "lr": 1e-3}, "window": 1,
                     "synthetic_gradient": {"hidden": 0, "optimizer": {"name": "adam", "lr": 1e-3}}},
        "nodes": {"source": {"role": "source"},
                  "l1": {"module": "nodes.mlp:Block", "args": {"d_in": 784, "d_out": WIDTH}},
                  "l2": {"module": "nodes.mlp:Block", "args": {"d_in": WIDTH, "d_out": WIDTH}},
                  "head": {"role": "head", "module": "nodes.mlp:Classifier",
                           "args": {"d_in": WIDTH, "classes": 10}}},
        "edges": ["source -> l1", "l1 -> l2", "l2 -> head"],
        "hosts": {"local": {"address": "127.0.0.1", "base_port": base_port()}},
    }


def write_topology(folder: Path, topology: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mesh.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    return path


def spawn(command: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def end_process(process: subprocess.Popen | ForkedProcess) -> None:
    """Ask nicely (a launcher then stops its nodes), then kill."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)  # polling files and processes, not synchronising with them


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line still being written
            pass
    return out


def final_record(path: Path) -> dict:
    finals = [r for r in records(path) if r.get("event") == "final"]
    assert finals, f"no final record in {path}"
    return finals[-1]


def log_mentions(log: Path, peer: bytes) -> int:
    """Lines of a node's log that name `peer` as the sender of a dropped message."""
    name = repr(peer.decode())
    return sum(f"peer {name}" in line for line in log.read_text(errors="replace").splitlines())


# Raw sockets, as an outsider writes them from protocols/wire-v1.md section 7.

def frames(message: wire.Message) -> list[bytes]:
    return [bytes(f) for f in wire.encode(message)]


@dataclass
class Conn:
    """One DEALER connection to an inbox, under a routing id of our choosing."""
    socket: zmq.Socket
    monitor: zmq.Socket
    identity: bytes

    def send(self, parts: list[bytes]) -> None:
        self.socket.send_multipart(parts, zmq.NOBLOCK)  # high-water marks are far above our use

    def send_if_queued(self, parts: list[bytes]) -> None:
        """Send on a connection whose handshake was refused: once ZeroMQ has dropped its pipe
        it refuses the send (EAGAIN), which delivers nothing, the outcome under test; until
        then the message is queued and never gets past the handshake."""
        try:
            self.send(parts)
        except zmq.Again:
            pass

    def handshake(self, timeout: float) -> int:
        """The first handshake event of this connection: it succeeded, or it was refused."""
        if not self.monitor.poll(int(timeout * 1000)):
            raise AssertionError(f"connection {self.identity!r} made no handshake in {timeout:.0f} s")
        return recv_monitor_message(self.monitor)["event"]

    def wait_connected(self, timeout: float = 120) -> None:
        """Until the ZMTP handshake with the inbox is done (the inbox knows our routing id)."""
        assert self.handshake(timeout) == zmq.EVENT_HANDSHAKE_SUCCEEDED, f"{self.identity!r} was refused"

    def wait_refused(self, timeout: float = 120) -> None:
        assert self.handshake(timeout) != zmq.EVENT_HANDSHAKE_SUCCEEDED, f"{self.identity!r} got in"

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=0)


HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def connect(context: zmq.Context, address: str, identity: bytes | None,
            curve: tuple[Curve, bytes] | None = None) -> Conn:
    """identity None: claim no routing id (as dni_mesh's peers under CURVE). curve: our keys
    and the public key of the inbox we dial."""
    sock = context.socket(zmq.DEALER)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if curve is not None:
        keys, server_key = curve
        for option, value in ((zmq.CURVE_SERVERKEY, server_key), (zmq.CURVE_PUBLICKEY, keys.public_key),
                              (zmq.CURVE_SECRETKEY, keys.secret_key)):
            sock.setsockopt(option, value)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    sock.setsockopt(zmq.RECONNECT_IVL, 20)
    monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
    sock.connect(address)
    return Conn(sock, monitor, identity or b"")


def recv_message(sock: zmq.Socket, timeout: float, router: bool) -> tuple[bytes, wire.Message]:
    if not sock.poll(int(timeout * 1000)):
        raise TimeoutError(f"nothing arrived within {timeout:.0f} s")
    parts = sock.recv_multipart()
    peer = parts.pop(0) if router else b""
    return peer, wire.decode(parts)


# The mesh under attack.

def forged_for(top: Topology, node: str) -> dict[str, tuple[bytes, list[tuple[list[bytes], str]]]]:
    """Per class: (sender identity, [(message frames, the counter it must land in)]) for one
    node's inbox. Every message here is sent by someone the topology does not put at the other
    end of the edge it names, or names an edge or kind the node does not take."""
    ins, outs = top.inputs(node), top.outputs(node)
    neighbours = {e.src for e in ins} | {e.dst for e in outs}
    stranger_name = next(n for n in top.nodes if n != node and n not in neighbours)
    in_edge = ins[0].name if ins else f"ghost->{node}"
    in_shape = FEATURES[ins[0].src] if ins else (WIDTH,)
    out_edge = outs[0].name if outs else f"{node}->ghost"
    out_shape = FEATURES[node] if outs else (WIDTH,)
    x, y = torch.zeros(BATCH, *in_shape), torch.zeros(BATCH, dtype=torch.int64)
    dh = torch.zeros(BATCH, *out_shape)
    total = STEPS + EVAL_BATCHES
    bad, unexpected, rejected = COUNTERS
    return {
        "deep": (b"evil-deep", [([DEEP], bad), ([DEEP_MAP], bad), ([DEEP_MAX], bad)]),
        "act": (b"evil-act", [
            (frames(wire.Activation(in_edge, 10**9, x, y)), rejected),             # unknown seq
            (frames(wire.Activation(f"ghost->{node}", 0, x, y)), rejected),       # no such edge
            (frames(wire.Activation(in_edge, 0, x, y)), rejected),                # wrong identity
            (frames(wire.Activation(in_edge, 0, torch.zeros(BATCH, 7), y)), rejected),  # shape
            (frames(wire.Activation(in_edge, 0, x, torch.full((BATCH,), 10))), rejected),  # labels
        ]),
        "grad": (b"evil-grad", [
            (frames(wire.Gradient(out_edge, 0, dh)), rejected),
            (frames(wire.Gradient(out_edge, 10**9, dh)), rejected),
            (frames(wire.Gradient(out_edge, 0, torch.zeros(BATCH, 3))), rejected),
            (frames(wire.Gradient(out_edge, 0)), rejected),
            (frames(wire.Gradient("ghost", 0, dh)), rejected),
        ]),
        "end": (b"evil-end", [
            (frames(wire.End(in_edge, total)), rejected),   # the right count, from a stranger
            (frames(wire.End(in_edge, 0)), rejected),
            (frames(wire.End(in_edge, 1)), rejected),
            (frames(wire.End("ghost", 0)), rejected),
        ]),
        "stop": (b"evil-stop", [
            (frames(wire.Stop(node, "forged stop")), unexpected),
            (frames(wire.Stop("launcher", "forged stop")), unexpected),
        ]),
        "kinds": (b"evil-kinds", [
            (frames(wire.Hello(node, 1, "evil", "tcp://127.0.0.1:1")), unexpected),
            (frames(wire.Ready(node)), unexpected),
            (frames(wire.Bound(node, "tcp://127.0.0.1:1")), unexpected),
            (frames(wire.Peers({n: "tcp://127.0.0.1:1" for n in top.nodes})), unexpected),
            (frames(wire.Heartbeat(node, 10**6, time.time())), unexpected),
            (frames(wire.Metrics(node, 0, {"event": "final", "steps": 0})), unexpected),
            (frames(wire.Error(node, "forged error")), unexpected),
            (frames(wire.EndAck(in_edge, total)), unexpected),
        ]),
        # A real node's name that is not this node's neighbour: the right edge, seq and shape.
        "wrong-identity": (stranger_name.encode(), [
            (frames(wire.Activation(in_edge, 0, x, y)), rejected),
            (frames(wire.Gradient(out_edge, 0, dh)), rejected),
            (frames(wire.End(in_edge, total)), rejected),
            (frames(wire.Stop(node, "forged stop")), unexpected),
        ]),
    }


def impostor_messages(top: Topology, node: str, name: str) -> list[list[bytes]]:
    """What an impostor with neighbour `name`'s routing id sends to `node`: if any of it were
    taken as that neighbour's, the node would end, stop or train on it."""
    total = STEPS + EVAL_BATCHES
    out = [frames(wire.Stop(node, "forged stop")), [DEEP]]
    for edge in top.inputs(node):
        if edge.src == name:
            x = torch.zeros(BATCH, *FEATURES[name])
            out += [frames(wire.Activation(edge.name, seq, x, torch.zeros(BATCH, dtype=torch.int64)))
                    for seq in range(STEPS, STEPS + 4)]
            out.append(frames(wire.End(edge.name, total)))
    for edge in top.outputs(node):
        if edge.dst == name:
            dh = torch.zeros(BATCH, *FEATURES[node])
            out += [frames(wire.Gradient(edge.name, seq, dh)) for seq in range(STEPS, STEPS + 4)]
    return out


@dataclass
class MeshResult:
    topology: Topology
    run_dir: Path
    code: int
    summary: dict
    twin_dir: Path
    twin_code: int
    twin_summary: dict
    sent: dict[str, dict[str, tuple[bytes, Counter]]]  # node -> class -> (identity, counters)
    impostors: dict[str, list[bytes]]  # node -> identities that connected with a neighbour's name
    impostors_in_training: bool  # they were connected before the head's last training step
    replies: dict[bytes, list]  # what any attacker's connection got back (an EndAck, a Stop...)


def start_run(folder: Path, topology: dict) -> tuple[Path, Path, subprocess.Popen]:
    path = write_topology(folder, topology)
    run_dir = folder / "run"
    process = spawn([sys.executable, "-m", "dni_mesh.cli", "run", str(path), "--run-dir",
                     str(run_dir), "--summary", str(folder / "summary.json"), "--no-live"],
                    folder / "launcher.log")
    return path, run_dir, process


def read_summary(folder: Path) -> dict:
    path = folder / "summary.json"  # written only by a run that succeeded
    return json.loads(path.read_text()) if path.exists() else {}


def head_steps(run_dir: Path) -> int:
    return sum(r.get("event") == "step" for r in records(run_dir / "head.jsonl"))


def slow_chain(name: str) -> dict:
    """`chain` whose head is 100 ms away each way: at window 1 every step waits a 200 ms round
    trip, so training lasts STEPS x 0.2 s however fast the machine, and the impostors (who
    connect at the head's second step) are in place seconds before it ends. The delay does not
    change the math: the twin runs the same topology."""
    return {**chain(name), "links": {"l2 -> head": {"delay_ms": 100}}}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> MeshResult:
    tmp = tmp_path_factory.mktemp("mesh")
    path, run_dir, process = start_run(tmp / "attacked", slow_chain("hostile"))
    _, twin_dir, twin = start_run(tmp / "twin", slow_chain("hostile"))
    context = zmq.Context()
    conns: list[Conn] = []
    try:
        top = load_topology(path)
        # Strangers connect at once: their messages wait in their queues until the inbox is up,
        # and the node reads them (its inbox takes from each connection in turn) long before
        # the mesh's last batch, so each is counted.
        sent: dict[str, dict[str, tuple[bytes, Counter]]] = {}
        for node, spec in top.nodes.items():
            sent[node] = {}
            for cls, (identity, messages) in forged_for(top, node).items():
                conn = connect(context, spec.address, identity)
                conns.append(conn)
                for parts, counter in messages:
                    conn.send(parts)
                sent[node][cls] = (identity, Counter(counter for _, counter in messages))
        # Impostors once every edge carries traffic: at the head's second step every node has
        # had an answer from downstream, so each neighbour's connection holds its name.
        wait_for(lambda: head_steps(run_dir) >= 2 or process.poll() is not None, 180,
                 "the attacked mesh to train")
        assert process.poll() is None, (tmp / "attacked" / "launcher.log").read_text()[-3000:]
        impostors: dict[str, list[bytes]] = {}
        pending: list[Conn] = []
        for node, spec in top.nodes.items():
            names = sorted({e.src for e in top.inputs(node)} | {e.dst for e in top.outputs(node)})
            impostors[node] = [n.encode() for n in names]
            for name in names:
                silent = connect(context, spec.address, name.encode())  # sends nothing, stays
                talker = connect(context, spec.address, name.encode())
                conns += [silent, talker]
                pending += [silent, talker]
                for parts in impostor_messages(top, node, name):
                    talker.send(parts)
        for conn in pending:
            conn.wait_connected(60)
        impostors_in_training = head_steps(run_dir) < STEPS
        deadline = time.monotonic() + 240
        for p in (process, twin):
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        # The nodes have exited: whatever they sent our connections has arrived or never will.
        replies: dict[bytes, list] = {}
        for conn in conns:
            while conn.socket.poll(50):
                replies.setdefault(conn.identity, []).append(conn.socket.recv_multipart())
        yield MeshResult(top, run_dir, process.returncode, read_summary(tmp / "attacked"),
                         twin_dir, twin.returncode, read_summary(tmp / "twin"),
                         sent, impostors, impostors_in_training, replies)
    finally:
        for conn in conns:
            conn.close()
        context.term()
        end_process(process)
        end_process(twin)


def head_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in records(run_dir / "head.jsonl") if r.get("event") == "step"]


def expected_counts(result: MeshResult, node: str) -> dict[str, int]:
    total: Counter = Counter()
    for _, counters in result.sent[node].values():
        total.update(counters)
    return {name: total[name] for name in COUNTERS}


def assert_mesh_survived(result: MeshResult) -> None:
    launcher_log = result.run_dir.parent / "launcher.log"
    assert result.code == 0, launcher_log.read_text()[-3000:]
    assert result.twin_code == 0, (result.twin_dir.parent / "launcher.log").read_text()[-3000:]
    nodes = result.summary["nodes"]
    for summary in (result.summary, result.twin_summary):
        assert {n: (v["steps"], v["eval_batches"]) for n, v in summary["nodes"].items()} \
            == dict.fromkeys(nodes, (STEPS, EVAL_BATCHES))


@pytest.mark.timeout(360)
def test_mesh_under_attack_exits_0_counts_every_message_and_learns_as_its_twin(mesh):
    assert_mesh_survived(mesh)
    assert mesh.impostors_in_training, "the mesh finished training before the impostors connected"
    assert mesh.summary["test_accuracy"] == mesh.twin_summary["test_accuracy"]
    assert head_losses(mesh.run_dir) == head_losses(mesh.twin_dir)
    assert len(head_losses(mesh.run_dir)) == STEPS
    for node, values in mesh.summary["nodes"].items():
        counted = {name: values[name] for name in COUNTERS}
        assert counted == expected_counts(mesh, node), node
        twin = mesh.twin_summary["nodes"][node]
        assert {name: twin[name] for name in COUNTERS} == dict.fromkeys(COUNTERS, 0), node
        assert values["dropped_messages"] == twin["dropped_messages"], node


@pytest.mark.timeout(360)
@pytest.mark.parametrize("cls", ["deep", "act", "grad", "end", "stop", "kinds", "wrong-identity"])
def test_mesh_drops_and_counts_each_forged_class(mesh, cls):
    """deep: the 1001-byte frame (was RecursionError); act: unknown seq, unknown edge, wrong
    identity, wrong shape, labels out of range (was held forever); grad: not in flight, wrong
    shape, bare credit; end: right and wrong counts from a stranger (was: ended the node early,
    acked the forger); stop (was: stopped the node); kinds the node never takes; and the same
    from a real node's name that is not the target's neighbour."""
    assert_mesh_survived(mesh)
    assert mesh.replies == {}  # no End was acknowledged to a forger, nothing else answered
    for node in mesh.topology.nodes:
        identity, counters = mesh.sent[node][cls]
        log = mesh.run_dir / f"{node}.log"
        assert log_mentions(log, identity) == sum(counters.values()), (node, log.read_text()[-3000:])


@pytest.mark.timeout(360)
def test_mesh_ignores_impostors_with_a_neighbours_name(mesh):
    """A DEALER whose routing id is a real neighbour's name, silent or sending, once that
    neighbour is connected (was: ROUTER_HANDOVER gave it the edge and stalled the mesh). Its
    messages never reach the node (the transport ignores a second connection with a name), so
    nothing of it is counted, logged or learnt from."""
    assert_mesh_survived(mesh)
    assert mesh.impostors_in_training
    assert mesh.replies == {}
    assert head_losses(mesh.run_dir) == head_losses(mesh.twin_dir)
    for node, names in mesh.impostors.items():
        log = mesh.run_dir / f"{node}.log"
        for name in names:
            assert log_mentions(log, name) == 0, (node, name)


# One node under attack from its own neighbours' connections.

N_TRAIN, N_EVAL = 6, 2
N_BATCHES = N_TRAIN + N_EVAL


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The input, labels and head gradient of seq t: the same in every run."""
    g = torch.Generator().manual_seed(1000 + t)
    return (torch.randn(BATCH, WIDTH, generator=g), torch.randint(0, 10, (BATCH,), generator=g),
            torch.randn(BATCH, WIDTH, generator=g) * 1e-2)


def phase_of(t: int) -> str:
    return "train" if t < N_TRAIN else "eval"


def describe(message: wire.Message) -> tuple:
    """A message as plain comparable values, tensors as their bytes."""
    tensors = tuple((name, str(t.dtype), tuple(t.shape), t.numpy().tobytes())
                    for name in message.TENSORS if (t := getattr(message, name)) is not None)
    fields = tuple(getattr(message, name) for name, _ in message.FIELDS)
    return (message.KIND, fields, tensors)


class NamedKeys(ThreadAuthenticator):
    """pyzmq's own ZAP handler, as an outsider's l1 and head would run it: admits the mesh's
    keys and names each connection after its key file."""

    def __init__(self, context: zmq.Context, keys: Path):
        super().__init__(context)
        self.names = {key: name for name, key in curve_for(keys, "l1", ()).public_keys.items()}
        self.start()
        self.configure_curve(domain="*", location=str(keys))

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names[z85.encode(client_public_key)]


class Neighbours:
    """The test as l1 and head of a real `dni-mesh node l2`: l1's and head's inboxes (where l2
    sends its gradients and outputs) and their connections to l2's inbox (acts, grads, End).
    With the mesh's CURVE keys, l1 and head speak CURVE and, as dni_mesh's peers do, claim no
    routing id; their inboxes check that what arrives comes from l2's key."""

    def __init__(self, context: zmq.Context, top: Topology, keys: Path | None = None):
        self.context, self.top, self.keys = context, top, keys
        self.auth = NamedKeys(context, keys) if keys is not None else None
        self.sockets: list[zmq.Socket] = []
        self.conns: list[Conn] = []
        self.l1_inbox = self.router(top.nodes["l1"].address, "l1")
        self.head_inbox = self.router(top.nodes["head"].address, "head")
        self.l2 = top.nodes["l2"].address
        self.l2_routes: dict[zmq.Socket, bytes] = {}  # the routing id l2's connections came with
        self.outputs: list[tuple] = []     # what l2 sent, in order
        self.l1_replies: list[tuple] = []  # what l2's inbox sent back on l1's connection
        self.head_replies: list[tuple] = []

    def connect_own(self) -> None:
        """l1's and head's own connections (after any an attack made first)."""
        if self.keys is None:
            self.l1, self.head = self.connect(b"l1"), self.connect(b"head")
        else:
            self.l1, self.head = self.connect(None, "l1"), self.connect(None, "head")
        self.l1.wait_connected()
        self.head.wait_connected()

    def router(self, address: str, name: str) -> zmq.Socket:
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.keys is not None:
            keys = curve_for(self.keys, name, ())
            for option, value in ((zmq.CURVE_SERVER, 1), (zmq.CURVE_PUBLICKEY, keys.public_key),
                                  (zmq.CURVE_SECRETKEY, keys.secret_key)):
                sock.setsockopt(option, value)
        sock.bind(address)
        self.sockets.append(sock)
        return sock

    def connect(self, identity: bytes | None, keys: str | Curve | None = None) -> Conn:
        """To l2's inbox; keys: whose of this mesh (a name), or any keys, for CURVE."""
        curve = None
        if keys is not None:
            server_key = curve_for(self.keys, "l2", ()).public_key
            curve = (curve_for(self.keys, keys, ()) if isinstance(keys, str) else keys, server_key)
        conn = connect(self.context, self.l2, identity, curve)
        self.conns.append(conn)
        return conn

    def expect(self, sock: zmq.Socket, kind: type, seq: int, timeout: float = 120) -> wire.Message:
        if not sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"nothing arrived within {timeout:.0f} s")
        parts = sock.recv_multipart(copy=False)
        sender = parts[0].get("User-Id") if self.keys is not None else parts[0].bytes.decode()
        assert sender == "l2", sender
        self.l2_routes[sock] = parts[0].bytes
        message = wire.decode([p.bytes for p in parts[1:]])
        assert isinstance(message, kind) and message.seq == seq, describe(message)[:2]
        self.outputs.append(describe(message))
        return message

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        for sock in self.sockets:
            sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()


class Attack:
    """Hooks called around each legitimate message; each counts what it sends by the counter
    the node must put it in. Every forged message goes out on a connection ahead of a real one
    that the node must take before it can finish (messages of one connection arrive in order),
    so each is certainly read: the counts are exact, with no waiting."""
    impostor_first = False
    curve = False  # l2 and its neighbours use the mesh's CURVE keys

    def __init__(self) -> None:
        self.expected: Counter = Counter()

    def send(self, conn: Conn, parts: list[bytes], counter: str | None) -> None:
        conn.send(parts)
        if counter is not None:
            self.expected[counter] += 1

    def first(self, n: Neighbours, log: Path) -> None:
        """Before l1 and head connect."""

    def setup(self, n: Neighbours) -> None: ...
    def before_act(self, n: Neighbours, t: int) -> None: ...
    def after_act(self, n: Neighbours, t: int, act: list[bytes]) -> None: ...
    def before_grad(self, n: Neighbours, t: int) -> None: ...
    def after_grad(self, n: Neighbours, t: int, grad: list[bytes]) -> None: ...
    def before_end(self, n: Neighbours) -> None: ...


class Deep(Attack):
    """The 1001-byte, 1000-deep frame (and deeper ones) from both neighbours, mid-run."""

    def before_act(self, n, t):
        if t in (0, 4):
            self.send(n.l1, [DEEP], "bad_messages")
        if t == 4:
            self.send(n.l1, [DEEP_MAP], "bad_messages")
            self.send(n.l1, [DEEP_MAX], "bad_messages")

    def before_grad(self, n, t):
        if t == 2:
            self.send(n.head, [DEEP], "bad_messages")


class Acts(Attack):
    """Forged acts over l1's own connection: unknown, future and past seqs, edges that do not
    end here, wrong shapes, dtypes and batch sizes, labels out of range or missing; one from
    head's connection (the wrong identity); and a second copy of each real act."""

    def before_act(self, n, t):
        x, y, _ = batch(t)
        phase = phase_of(t)
        forged = [
            wire.Activation("l1->l2", t + 1, x, y, phase),
            wire.Activation("l1->l2", 10**12, x, y, phase),
            wire.Activation("ghost->l2", t, x, y, phase),
            wire.Activation("source->l1", t, x, y, phase),
            wire.Activation("l1->l2", t, torch.zeros(BATCH, WIDTH + 1), y, phase),
            wire.Activation("l1->l2", t, x.double(), y, phase),
            wire.Activation("l1->l2", t, x[:, :, None], y, phase),
            wire.Activation("l1->l2", t, x, torch.full((BATCH,), 10), phase),
            wire.Activation("l1->l2", t, x, torch.full((BATCH,), -1), phase),
            wire.Activation("l1->l2", t, x, y[:-1], phase),
            wire.Activation("l1->l2", t, torch.zeros(BATCH + 1, WIDTH),
                            torch.zeros(BATCH + 1, dtype=torch.int64), phase),
            wire.Activation("l1->l2", t, torch.zeros(0, WIDTH), torch.zeros(0, dtype=torch.int64), phase),
        ]
        if t:
            forged.append(wire.Activation("l1->l2", t - 1, x, y, phase))
        if phase == "train":
            forged.append(wire.Activation("l1->l2", t, x, None, "train"))
        for message in forged:
            self.send(n.l1, frames(message), "rejected")
        self.send(n.head, frames(wire.Activation("l1->l2", t, x, y, phase)), "rejected")

    def after_act(self, n, t, act):
        self.send(n.l1, act, "rejected")


class Grads(Attack):
    """Forged grads over head's own connection while seq t is in flight: other seqs (future,
    answered, absurd), wrong shapes and dtypes, a bare credit where a gradient is due (and a
    gradient where a credit is), edges that are not l2's out-edge; one from l1's connection
    (the wrong identity); and a second copy of each real answer."""

    def before_grad(self, n, t):
        _, _, dh = batch(t)
        forged = [
            wire.Gradient("l2->head", t + 1, dh),
            wire.Gradient("l2->head", 10**12, dh),
            wire.Gradient("l2->head", t, torch.zeros(BATCH, WIDTH - 1)),
            wire.Gradient("l2->head", t, torch.zeros(BATCH + 1, WIDTH)),
            wire.Gradient("l2->head", t, torch.zeros(BATCH, WIDTH, dtype=torch.int64)),
            wire.Gradient("l2->head", t) if phase_of(t) == "train" else wire.Gradient("l2->head", t, dh),
            wire.Gradient("l1->l2", t, dh),
            wire.Gradient("ghost", t, dh),
        ]
        if t:
            forged.append(wire.Gradient("l2->head", t - 1, dh))
        for message in forged:
            self.send(n.head, frames(message), "rejected")
        self.send(n.l1, frames(wire.Gradient("l2->head", t, dh)), "rejected")

    def after_grad(self, n, t, grad):
        if t < N_BATCHES - 1:  # after the last one, l1's End may finish the node first
            self.send(n.head, grad, "rejected")


class Ends(Attack):
    """Forged ends: wrong counts over l1's own connection (mid-run and just before the real
    End), the right count from head's connection, edges that are not l2's in-edge. None may be
    acknowledged, and the node must not end early."""

    def before_act(self, n, t):
        if t == 2:  # two acts have arrived: End(2) from l1 would be the truth
            for count in (1, 3, 10**12):
                self.send(n.l1, frames(wire.End("l1->l2", count)), "rejected")
            self.send(n.l1, frames(wire.End("ghost->l2", 2)), "rejected")
            self.send(n.l1, frames(wire.End("l2->head", 2)), "rejected")
            self.send(n.head, frames(wire.End("l1->l2", 2)), "rejected")

    def before_grad(self, n, t):
        if t == N_BATCHES - 1:  # head's connection: ahead of the last answer the node waits for
            self.send(n.head, frames(wire.End("l1->l2", N_BATCHES)), "rejected")

    def before_end(self, n):
        for count in (N_BATCHES - 1, N_BATCHES + 1):
            self.send(n.l1, frames(wire.End("l1->l2", count)), "rejected")


class Stops(Attack):
    """Stop, and every other kind a node never takes, over its neighbours' own connections:
    only the launcher, over the node's control connection, may stop it."""

    def before_act(self, n, t):
        if t == 1:
            self.send(n.l1, frames(wire.Stop("l2", "forged stop")), "unexpected")
        if t == 5:
            self.send(n.l1, frames(wire.Stop("launcher", "forged stop")), "unexpected")
            for message in (wire.Hello("l1", 1, "evil", "tcp://127.0.0.1:1"), wire.Ready("l1"),
                            wire.Bound("l1", "tcp://127.0.0.1:1"),
                            wire.Peers({"l1": "tcp://127.0.0.1:1", "head": "tcp://127.0.0.1:1"}),
                            wire.Heartbeat("l1", 7, 1.0), wire.Metrics("l1", 7, {"loss": 0.5}),
                            wire.Error("l1", "forged"), wire.EndAck("l1->l2", 3)):
                self.send(n.l1, frames(message), "unexpected")

    def before_grad(self, n, t):
        if t == 3:
            self.send(n.head, frames(wire.Stop("l2", "forged stop")), "unexpected")

    def before_end(self, n):
        self.send(n.l1, frames(wire.Stop("l2", "forged stop")), "unexpected")


class Impostors(Attack):
    """Connections with l1's and head's names made after theirs, one silent all along and two
    sending what would change the run if it were taken as theirs (a different batch for every
    seq, Stop, End): none of it may reach the node, so none is counted either."""

    def setup(self, n):
        self.silent = n.connect(b"l1")
        self.l1 = n.connect(b"l1")
        self.head = n.connect(b"head")
        for conn in (self.silent, self.l1, self.head):
            conn.wait_connected()

    def before_act(self, n, t):
        x, y, _ = batch(t + 100)
        self.send(self.l1, frames(wire.Activation("l1->l2", t, x, y, phase_of(t))), None)
        self.send(self.l1, frames(wire.Stop("l2", "forged stop")), None)
        self.send(self.l1, frames(wire.End("l1->l2", t)), None)

    def before_grad(self, n, t):
        _, _, dh = batch(t + 100)
        dh = dh if phase_of(t) == "train" else None
        self.send(self.head, frames(wire.Gradient("l2->head", t, dh)), None)


class ImpostorFirst(Attack):
    """A connection that claims l1's name before l1 connects, and sends a batch of its own."""
    impostor_first = True

    def first(self, n, log):
        self.impostor = n.connect(b"l1")
        self.impostor.wait_connected()


class CurveImpostorsFirst(Attack):
    """With CURVE: connections that claim l1's name before l1 connects, with no key, with
    another mesh's l1 key, and with head's key (a member speaking as another), each sending a
    Stop, an End, the deep frame and a half batch as l1's. Only the member gets through the
    handshake; its messages are refused, once l2 has read each (its log says so) l1 connects."""
    curve = True

    def first(self, n, log):
        other = log.parent / "other-mesh"
        create_keys(other, ["l1"])
        keyless = n.connect(b"l1")
        foreign = n.connect(b"l1", curve_for(other, "l1", ()))
        member = n.connect(b"l1", "head")
        keyless.wait_refused()
        foreign.wait_refused()
        member.wait_connected()
        half = torch.zeros(BATCH // 2, WIDTH)
        for parts in (frames(wire.Stop("l2", "forged stop")), frames(wire.End("l1->l2", 0)), [DEEP],
                      frames(wire.Activation("l1->l2", 0, half, torch.zeros(BATCH // 2, dtype=torch.int64)))):
            keyless.send_if_queued(parts)
            foreign.send_if_queued(parts)
            member.send(parts)
            self.expected["refused"] += 1
        wait_for(lambda: log_refusals(log) == self.expected["refused"], 120, "l2 to refuse the member")


def log_refusals(log: Path) -> int:
    """Lines of a node's log that say its inbox refused a message from head's key claiming l1."""
    return sum("refused message" in line and "key 'head'" in line and "claims to be 'l1'" in line
               for line in log.read_text(errors="replace").splitlines())


NODE_ATTACKS: dict[str, type[Attack]] = {
    "clean": Attack, "deep": Deep, "acts": Acts, "grads": Grads, "ends": Ends, "stops": Stops,
    "impostors": Impostors, "impostor-first": ImpostorFirst, "curve-impostors-first": CurveImpostorsFirst,
}


@dataclass
class NodeRun:
    error: str | None = None
    code: int | None = None
    final: dict = field(default_factory=dict)
    expected: Counter = field(default_factory=Counter)
    outputs: list = field(default_factory=list)
    l1_replies: list = field(default_factory=list)
    head_replies: list = field(default_factory=list)
    first_output_rows: int | None = None
    log: str = ""


def drive(n: Neighbours, attack: Attack, run: NodeRun) -> None:
    """The protocol of l1 and head with l2 at window 1, with the attack's messages around it."""
    if isinstance(attack, ImpostorFirst):
        # The impostor's batch is half as large: l2's first output shows whose act it took.
        x = torch.zeros(BATCH // 2, WIDTH)
        attack.impostor.send(frames(wire.Activation("l1->l2", 0, x, torch.zeros(BATCH // 2, dtype=torch.int64))))
        x, y, _ = batch(0)
        n.l1.send(frames(wire.Activation("l1->l2", 0, x, y)))
        out = n.expect(n.head_inbox, wire.Activation, 0)
        run.first_output_rows = len(out.h)
        return
    attack.setup(n)
    for t in range(N_BATCHES):
        x, y, dh = batch(t)
        phase = phase_of(t)
        attack.before_act(n, t)
        act = frames(wire.Activation("l1->l2", t, x, y, phase))
        n.l1.send(act)
        attack.after_act(n, t, act)
        n.expect(n.head_inbox, wire.Activation, t)  # l2 stepped seq t
        attack.before_grad(n, t)
        grad = frames(wire.Gradient("l2->head", t, dh if phase == "train" else None))
        n.head.send(grad)
        attack.after_grad(n, t, grad)
        n.expect(n.l1_inbox, wire.Gradient, t)      # l2's answer to l1 for seq t
    attack.before_end(n)
    n.l1.send(frames(wire.End("l1->l2", N_BATCHES)))
    # Everything l1's connection gets back comes in order: an EndAck to any forged End would
    # arrive before the one to the real End.
    _, reply = recv_message(n.l1.socket, 60, router=False)
    run.l1_replies.append(describe(reply))
    end = n.expect(n.head_inbox, wire.End, N_BATCHES)
    n.head_inbox.send_multipart([n.l2_routes[n.head_inbox], *frames(wire.EndAck(end.edge, end.seq))])


# `dni-mesh node l2` with the mesh's keys, until the topology names them (`security`).
CURVE_NODE = """
import logging, sys
from pathlib import Path
from dni_mesh.node import run_node
from dni_mesh.topology import load_topology
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
path, run_dir, keys = sys.argv[1:]
sys.exit(run_node(load_topology(path), "l2", None, Path(run_dir), curve_keys=Path(keys)))
"""


def start_node(forkserver: ForkServer, path: Path, run_dir: Path, keys: Path | None,
               log: Path) -> subprocess.Popen | ForkedProcess:
    if keys is not None:
        return spawn([sys.executable, "-c", CURVE_NODE, str(path), str(run_dir), str(keys)], log)
    return forkserver.start(["node", str(path), "--name", "l2", "--run-dir", str(run_dir)],
                            node_environment(), log, Path.cwd())


def run_node(forkserver: ForkServer, folder: Path, cls: str) -> NodeRun:
    """One `dni-mesh node l2` process driven under attack class `cls`."""
    run = NodeRun()
    attack = NODE_ATTACKS[cls]()
    path = write_topology(folder, chain(f"node-{cls}", steps=N_TRAIN))
    top = load_topology(path)
    keys = None
    if attack.curve:
        keys = folder / "keys"
        create_keys(keys, [*top.nodes, LAUNCHER])
    context = zmq.Context()
    neighbours = None
    process = start_node(forkserver, path, folder / "run", keys, folder / "l2.log")
    try:
        neighbours = Neighbours(context, top, keys)
        attack.first(neighbours, folder / "l2.log")
        neighbours.connect_own()
        drive(neighbours, attack, run)
        if not attack.impostor_first:
            run.code = process.wait(timeout=60)
            # The node has exited: whatever its inbox sent our connections has arrived or never will.
            for conn, replies in ((neighbours.l1, run.l1_replies), (neighbours.head, run.head_replies)):
                while conn.socket.poll(100):
                    replies.append(describe(wire.decode(conn.socket.recv_multipart())))
            run.final = final_record(folder / "run" / "l2.jsonl")
    except Exception:
        run.error = traceback.format_exc()
    finally:
        end_process(process)
        if neighbours is not None:
            run.outputs = neighbours.outputs
            neighbours.close()
        context.term()
        run.expected = attack.expected
        run.log = (folder / "l2.log").read_text(errors="replace")
    return run


@pytest.fixture(scope="module")
def node_runs(tmp_path_factory, forkserver) -> dict[str, NodeRun]:
    tmp = tmp_path_factory.mktemp("node")
    with ThreadPoolExecutor(len(NODE_ATTACKS)) as pool:
        futures = {cls: pool.submit(run_node, forkserver, tmp / cls, cls) for cls in NODE_ATTACKS}
        return {cls: future.result() for cls, future in futures.items()}


def assert_node_survived(runs: dict[str, NodeRun], cls: str) -> NodeRun:
    run, clean = runs[cls], runs["clean"]
    assert clean.error is None, clean.error + clean.log[-3000:]
    assert run.error is None, run.error + run.log[-3000:]
    assert run.code == 0, run.log[-3000:]
    assert run.final["status"] == "done"
    assert (run.final["steps"], run.final["eval_batches"]) == (N_TRAIN, N_EVAL)
    assert run.outputs == clean.outputs  # every activation and gradient l2 sent, bit for bit
    assert len(run.outputs) == 2 * N_BATCHES + 1
    assert run.l1_replies == [describe(wire.EndAck("l1->l2", N_BATCHES))]
    assert run.head_replies == []
    return run


@pytest.mark.timeout(300)
@pytest.mark.parametrize("cls", ["clean", "deep", "acts", "grads", "ends", "stops", "impostors"])
def test_node_takes_nothing_forged_from_its_neighbours_connections(node_runs, cls):
    """Each class over the neighbours' own connections: the node exits 0 after every real
    step, sends exactly what its unattacked twin sends, acknowledges only the real End, and
    counts every forged message where it belongs (bad_messages, unexpected or rejected)."""
    run = assert_node_survived(node_runs, cls)
    assert {name: run.final[name] for name in COUNTERS} == {name: run.expected[name] for name in COUNTERS}
    if cls != "clean":
        assert sum(run.expected.values()) > 0 or cls == "impostors"


@pytest.mark.timeout(300)
@pytest.mark.xfail(strict=True, reason=(
    "without CURVE, and without ROUTER_HANDOVER, the first connection to claim a name keeps it: "
    "an outsider that connects with l1's name before l1 does (node ports are in the topology) "
    "feeds l2 its own batches and l1's connection is ignored for good; CURVE closes this (below)"))
def test_node_without_curve_ignores_an_impostor_that_connects_before_its_neighbour(node_runs):
    run = node_runs["impostor-first"]
    assert run.error is None, run.error
    assert run.first_output_rows == BATCH


@pytest.mark.timeout(300)
def test_node_with_curve_ignores_impostors_that_connect_before_its_neighbour(node_runs):
    """No key and another mesh's key: refused in the handshake. head's key claiming l1's name:
    let in, but every message refused, and l1 (which claims no routing id) is not locked out. The
    node runs as its unattacked twin, bit for bit, and acknowledges only l1's End."""
    run = assert_node_survived(node_runs, "curve-impostors-first")
    assert {name: run.final[name] for name in COUNTERS} == dict.fromkeys(COUNTERS, 0)
    assert run.final["refused"] == run.expected["refused"] == 4
    assert run.final["refused_connections"] >= 2
