"""The node runtime: one OS process that owns one node of a topology.

A thin loop between sockets and the node's core (`dni_mesh.core`): it binds the node's inbox,
connects a peer to every neighbour's inbox (through the edge's emulated link) and to the
launcher's control inbox when there is one, then hands every received message to the core and
carries out the actions the core returns. The learning, the flow control and every check of a
message against the topology live in the core; here live the sockets, the metrics file and
liveness:

- a Heartbeat to the launcher at least every HEARTBEAT_S, carrying the core's progress
  counter, and while the node is idle a `waiting` record saying what it waits for (which edge,
  which seq), so the launcher can tell a stuck mesh from a slow one;
- Stop is taken only from the launcher, over the connection this node opened to it: a Stop
  that arrives in the inbox, where anyone can send, is counted and dropped.

With the mesh's CURVE keys (`curve_keys`, see `dni_mesh.security`) every socket of the node uses
CURVE: its inbox admits only its neighbours' keys, and its peers (the control one included)
accept only the key of the process they dial.

A node started by hand (no launcher) supervises itself: it prints a start line, its progress,
each evaluation and a final line to the terminal, says what it waits for while idle, and exits
with an error once it has made no progress for `stall_s` (a neighbour died or never came).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
import zmq

from dni_mesh import wire
from dni_mesh.build import build_core, largest_tensor, node_plan
from dni_mesh.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dni_mesh.core import Acknowledge, Action, Core, EndEdge, Record, Reject, Save, Send, StageCore
from dni_mesh.link import Link, link_to
from dni_mesh.security import LAUNCHER, Curve, SecurityError, curve_for
from dni_mesh.topology import AUTO, Topology
from dni_mesh.transport import (BLOCK, Envelope, Inbox, Peer, TransportConfig, TransportError,
                                address_towards)

log = logging.getLogger(__name__)

CONTROL_EDGE = "control"
HEARTBEAT_S = 0.5
"""Longest time between two heartbeats, and the longest wait in the inbox."""
PRINT_S = 5.0
"""A node started by hand prints its progress, or what it waits for, this often at most."""
STALL_S = 60.0
"""A node started by hand gives up after this long without progress (`--stall-timeout`)."""
END_TIMEOUT_MS = 30_000
"""How long a node waits for the EndAck of each of its out-edges."""
PATIENCE_MS = 30_000
"""A node's ZMTP handshake and heartbeat timeouts (see transport_config)."""
MIN_TENSOR_BYTES = 64 * 1024
"""The receive bound of a node whose messages are all tiny; the headers' own limit."""


class Stopped(Exception):
    """The launcher asked this node to stop, or is gone."""


class Stalled(RuntimeError):
    """A node without a launcher made no progress for its stall timeout."""


class Unbindable(RuntimeError):
    """The node's inbox cannot listen where the topology puts it; the text names the keys."""


class Console:
    """What a node started by hand prints: its start, progress at most every PRINT_S, each
    evaluation and epoch, what it waits for while idle, and its end."""

    def __init__(self, name: str):
        self.name = name
        self.last_print = 0.0  # of a step or waiting line

    def say(self, text: str) -> None:
        print(f"node {self.name}: {text}", flush=True)

    def record(self, values: dict, now: float) -> None:
        event = values.get("event")
        if event not in ("step", "eval", "epoch", "final", "rejoined", "peer_rejoined"):
            return
        if event == "step":
            if now - self.last_print < PRINT_S:
                return
            self.last_print = now
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()
                 if k not in ("node", "event", "time")}
        self.say(f"{event} " + " ".join(f"{k}={v}" for k, v in shown.items()))


def node_curve(keys: Path | None, topology: Topology, name: str, control: str | None) -> Curve | None:
    """The node's CURVE keys from the mesh's key folder (None: no CURVE). Its inbox admits its
    neighbours, whose inboxes its peers dial; the launcher's public key is checked up front too,
    so that a missing key file stops the node before any socket opens."""
    if keys is None:
        return None
    curve = curve_for(keys, name, topology.neighbours(name))
    if control is not None:
        curve.server_key(LAUNCHER)  # raises SecurityError naming the missing file
    return curve


def transport_config(topology: Topology, largest_tensor: int, curve: Curve | None = None) -> TransportConfig:
    """The topology's transport settings, made safe for the core's flow control, with the
    node's CURVE keys if it has them.

    Every kind blocks (the window, not dropping, bounds the queues) and the high-water marks
    leave room for a full window from each peer plus the control messages beside it. No
    received tensor may exceed the largest this node can legitimately be sent (libzmq drops
    an oversized frame before allocating it, and cuts that connection).
    """
    config = TransportConfig(**topology.transport)
    config.policy = {kind: BLOCK for kind in config.policy}
    room = max(node.window for node in topology.nodes.values()) + 4
    config.sndhwm = max(config.sndhwm, room)
    config.rcvhwm = max(config.rcvhwm, room)
    # Without handover, a peer that redials while its old connection lingers is ignored: so
    # no redial for a slow handshake or a late heartbeat on a loaded machine. A dead peer is
    # found by progress (the launcher, or the node's own stall timeout) instead.
    config.handshake_ivl_ms = max(config.handshake_ivl_ms, PATIENCE_MS)
    config.heartbeat_timeout_ms = max(config.heartbeat_timeout_ms, PATIENCE_MS)
    bound = max(largest_tensor, MIN_TENSOR_BYTES)
    config.max_msg_bytes = min(config.max_msg_bytes, bound)
    config.limits = replace(config.limits, max_tensor_bytes=min(config.limits.max_tensor_bytes, bound),
                            max_message_bytes=min(config.limits.max_message_bytes, 2 * bound))
    config.curve = curve
    return config


class Runtime:
    """Sockets, metrics and liveness of one node; it knows nothing of learning.

    A link holds sent tensors zero-copy until their time comes: nothing here or in the core
    modifies a tensor in place after sending it.
    """

    def __init__(self, topology: Topology, name: str, control: str | None, run_dir: Path,
                 stall_s: float = STALL_S, resumed: bool = False, curve: Curve | None = None):
        """Open the control connection and say Hello at once, so the launcher hears from the
        node while it builds its core; `bind` and `dial` open the mesh's sockets after that.
        curve: this node's CURVE keys (`dni_mesh.security.curve_for`), for every socket."""
        self.topology = topology
        self.name = name
        self.console = None if control else Console(name)
        self.stall_s = stall_s
        self.curve = curve
        self.context = zmq.Context()
        self.control = (Peer(control, name, transport_config(topology, 0, curve), self.context, server=LAUNCHER)
                        if control else None)
        self.inbox: Inbox | None = None
        self.config: TransportConfig | None = None  # the mesh sockets', set by `bind`
        self.peers: dict[str, Peer | Link] = {}
        self.parent = os.getppid()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.metrics = (run_dir / f"{name}.jsonl").open("a" if resumed else "w")
        self.started = time.monotonic()
        self.last_report = 0.0
        self.next_beat = 0.0
        self.last_progress = -1
        self.advanced = time.monotonic()  # when progress last moved
        self.steps = 0  # the core's training steps, for Metrics.step
        self.control_seq = 0
        self.rejected_by_peer: Counter[str] = Counter()
        self.say(wire.Hello(name, os.getpid(), socket.gethostname(), topology.nodes[name].address))

    def bind(self, largest_tensor: int) -> None:
        """Bind the inbox where the topology puts it (port 0: a free port the system picks) and
        tell the launcher where it listens."""
        topology, name = self.topology, self.name
        self.config = transport_config(topology, largest_tensor, self.curve)
        spec = topology.nodes[name]
        address = spec.address
        if topology.found_at_run_time(name):
            if self.control is None:
                raise Unbindable(f"node {name}: its address is found at run time (port 0, or host "
                                 f"{spec.host}'s address auto), which needs a launcher to tell its "
                                 f"peers; started by hand, a node needs hosts.{spec.host}.address "
                                 f"and a fixed port (nodes.{name}.port or hosts.{spec.host}.base_port)")
            if topology.hosts[spec.host].address == AUTO:
                address = f"tcp://{address_towards(self.control.address)}:{spec.port}"
        try:
            self.inbox = Inbox(address, name, self.config, self.context)
        except TransportError as error:
            raise Unbindable(f"node {name}: {error}; move it with --set nodes.{name}.port=N or "
                             f"hosts.{spec.host}.base_port, and check that {spec.address} is an "
                             "address of this machine") from None
        self.say(wire.Bound(name, self.inbox.address))

    def peer_addresses(self) -> dict[str, str]:
        """Where each neighbour's inbox listens: the launcher's `Peers` when there is a launcher
        (it knows the ports chosen at run time), else the topology's addresses."""
        wanted = sorted(self.topology.neighbours(self.name))
        if self.control is None:
            unknown = [n for n in wanted if self.topology.found_at_run_time(n)]
            if unknown:
                raise Unbindable(f"node {self.name}: neighbour {unknown[0]}'s address is found at "
                                 "run time (port 0, or an auto host address): only a launcher can "
                                 "say where it listens; to start nodes by hand, give every node a "
                                 "host address and a fixed port")
            return {n: self.topology.nodes[n].address for n in wanted}
        while True:
            message = self.from_launcher(int(HEARTBEAT_S * 1000))
            if isinstance(message, wire.Peers):
                if sorted(message.addresses) != wanted:
                    raise RuntimeError(f"node {self.name}: the launcher's peers name "
                                       f"{sorted(message.addresses)}, not its neighbours {wanted}")
                return message.addresses

    def dial(self, addresses: dict[str, str], kernel_bandwidth: bool = False) -> None:
        """Connect a peer, through the edge's link, to every neighbour at its address.
        kernel_bandwidth: the network (`--hosts netns`) shapes the bandwidth between hosts, so
        links here only delay."""
        topology, name = self.topology, self.name
        self.peers = {n: link_to(topology, name, n,
                                 Peer(address, name, self.config, self.context, server=n),
                                 kernel_bandwidth)
                      for n, address in sorted(addresses.items())}
        if self.console is not None:
            self.console.say(f"ready, inbox {self.inbox.address}; in-edges "
                             f"{', '.join(e.name for e in topology.inputs(name)) or 'none'}; out-edges "
                             f"{', '.join(e.name for e in topology.outputs(name)) or 'none'}")

    def say(self, message: wire.Message) -> None:
        """Send to the launcher, if there is one."""
        if self.control is not None:
            self.control.send(message)
            self.control_seq += 1

    def record(self, values: dict, force: bool = False) -> None:
        """Append a metrics line; forward it to the launcher at most twice a second."""
        values = {"node": self.name, "time": round(time.monotonic() - self.started, 4), **values}
        self.metrics.write(json.dumps(values) + "\n")
        now = time.monotonic()
        if self.console is not None:
            self.console.record(values, now)
        if force or now - self.last_report >= 0.5:
            self.last_report = now
            self.metrics.flush()
            self.report(values)

    def report(self, values: dict) -> None:
        live = {k: v for k, v in values.items()
                if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k != "node"}
        self.say(wire.Metrics(self.name, self.steps, live))

    def recv(self) -> Envelope | None:
        return self.inbox.recv(int(HEARTBEAT_S * 1000))

    def beat(self, core: Core) -> None:
        """Every HEARTBEAT_S: with a launcher, heartbeat, a `waiting` record when idle, and a
        look at the control connection for Stop (raised as Stopped, as is the launcher's death);
        without one, say what the node waits for and give up (Stalled) after stall_s."""
        now = time.monotonic()
        if now < self.next_beat:
            return
        self.next_beat = now + HEARTBEAT_S
        progress, self.steps = core.counters.progress, core.counters.steps
        idle = progress == self.last_progress
        self.last_progress = progress
        if not idle:
            self.advanced = now
        if self.control is None:
            self.supervise_alone(core, now)
            return
        while self.from_launcher(0) is not None:
            pass  # nothing but Stop is taken from the launcher once the node runs
        self.say(wire.Heartbeat(self.name, progress, time.time()))
        if idle:
            self.report({"event": "waiting", "progress": progress, "waiting_for": core.waiting_for()})

    def from_launcher(self, timeout_ms: int) -> wire.Message | None:
        """The launcher's next message on the control connection, waiting up to timeout_ms;
        raises Stopped for its Stop, or when it is gone (this node's parent changed)."""
        if os.getppid() != self.parent:
            raise Stopped("launcher is gone")
        message = self.control.recv(timeout_ms)
        if isinstance(message, wire.Stop):
            raise Stopped(message.reason)
        return message

    def supervise_alone(self, core: Core, now: float) -> None:
        waited = now - self.advanced
        if waited > self.stall_s:
            raise Stalled(f"no progress for {self.stall_s:.0f} s: waits for {core.waiting_for()}")
        if waited >= PRINT_S and now - self.console.last_print >= PRINT_S:
            self.console.last_print = now
            self.console.say(f"waiting {waited:.0f} s for {core.waiting_for()}")

    def execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.peers[action.node].send(action.message)
            elif isinstance(action, Record):
                self.steps = action.values.get("step", self.steps)
                self.record(action.values, action.force)
            elif isinstance(action, Acknowledge):
                self.inbox.send(action.node, wire.EndAck(action.end.edge, action.end.seq))
            elif isinstance(action, Save):
                save_checkpoint(self.run_dir, self.name, action.state, action.seq)
            elif isinstance(action, EndEdge):
                if not self.peers[action.node].end(action.edge, action.count, END_TIMEOUT_MS):
                    raise RuntimeError(f"node {self.name}: no EndAck from {action.node} for "
                                       f"{action.edge} within {END_TIMEOUT_MS / 1000:.0f} s")
            elif isinstance(action, Reject):
                self.rejected_by_peer[action.peer] += 1
                count = self.rejected_by_peer[action.peer]
                if count <= 10 or count % 1000 == 0:  # a flooding peer must not flood the log
                    log.warning("node %s: dropped %s #%d from peer %r: %s", self.name,
                                action.kind, count, action.peer, action.reason)
            else:
                raise TypeError(f"node {self.name}: unknown action {action!r}")

    def finish(self, status: str, core: Core | None) -> None:
        """Report the final counters and flush them to the launcher before exiting."""
        counters = core.state_dict()["counters"] if core is not None else {}
        self.record({"event": "final", "status": status, **counters,
                     "samples_per_s": core.rate() if core is not None else 0.0,
                     "bad_messages": self.inbox.bad_messages if self.inbox is not None else 0,
                     "refused": self.inbox.refused if self.inbox is not None else 0,
                     "refused_connections": self.inbox.refused_connections if self.inbox is not None else 0,
                     "dropped_messages": sum(p.dropped for p in self.peers.values()),
                     "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
                    force=True)
        if self.control is not None:
            self.control.end(CONTROL_EDGE, self.control_seq, timeout_ms=5000)

    def close(self) -> None:
        self.metrics.close()
        for peer in self.peers.values():
            peer.close()
        if self.control is not None:
            self.control.close()
        if self.inbox is not None:
            self.inbox.close()
        self.context.term()


def run_node(topology: Topology, name: str, control: str | None, run_dir: Path,
             kernel_bandwidth: bool = False, stall_s: float = STALL_S,
             plan_path: Path | None = None, resume_at: int | None = None,
             rejoin: bool = False, curve_keys: Path | None = None) -> int:
    """Run one node to the end of its data; returns the process exit code. stall_s applies to a
    node without a launcher (control None); with one, the launcher watches progress. plan_path:
    the mesh's plan (`dni-mesh run` writes one), so that the node builds only its own module;
    without it the node resolves the plan itself. resume_at: start from the node's checkpoint
    in run_dir saved before this seq (every node of the mesh must resume at the same one).
    rejoin: this node died and was restarted while the mesh runs on: start from its newest
    checkpoint in run_dir (or from scratch) and rejoin its neighbours where they are.
    curve_keys: the mesh's key folder (`dni-mesh keys`): CURVE on every socket; a key that is
    missing or readable by others ends the node with code 2 before any socket opens."""
    try:
        curve = node_curve(curve_keys, topology, name, control)
    except SecurityError as error:
        print(f"node {name}: {error}", file=sys.stderr, flush=True)
        return 2
    torch.set_num_threads(topology.nodes[name].threads)
    runtime = Runtime(topology, name, control, run_dir, stall_s,
                      resumed=resume_at is not None or rejoin, curve=curve)
    status, code, core = "done", 0, None
    try:
        found = node_plan(topology, name, plan_path)
        checkpoint = (load_checkpoint(run_dir, name, resume_at)
                      if resume_at is not None or rejoin else None)
        core = build_core(topology, name, time.monotonic, found,
                          checkpoint.state if checkpoint is not None else None)
        runtime.bind(largest_tensor(topology, name, found))
        runtime.dial(runtime.peer_addresses(), kernel_bandwidth)
        runtime.say(wire.Ready(name))
        if rejoin:
            runtime.execute(core.rejoin(checkpoint.seq if checkpoint is not None else 0))
        runtime.execute(core.advance())
        while not core.finished:
            envelope = runtime.recv()
            if envelope is not None:
                runtime.execute(core.receive(envelope.peer, envelope.message))
            runtime.beat(core)
        if isinstance(core, StageCore):  # the final weights, for `dni-mesh plot --rdm` (dni_mesh.rdm)
            torch.save(core.stage.state_dict(), run_dir / f"{name}.pt")
    except Stopped as stop:
        status, code = f"stopped: {stop}", 130
    except Stalled as stall:
        status, code = f"stalled: {stall}", 1
    except (Unbindable, CheckpointError) as error:
        status, code = f"error: {error}", 2
        print(error, file=sys.stderr, flush=True)
        runtime.say(wire.Error(name, status))
    except Exception as error:
        status = f"error: {type(error).__name__}: {error}"
        runtime.say(wire.Error(name, status))
        raise
    finally:
        runtime.finish(status, core)
        runtime.close()
    return code
