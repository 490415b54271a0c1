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
"""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
import zmq

from dni_mesh import wire
from dni_mesh.build import build_core, largest_tensor, probe
from dni_mesh.core import Acknowledge, Action, Core, EndEdge, Record, Reject, Send
from dni_mesh.link import Link, link_to
from dni_mesh.topology import Topology
from dni_mesh.transport import BLOCK, Envelope, Inbox, Peer, TransportConfig

log = logging.getLogger(__name__)

CONTROL_EDGE = "control"
HEARTBEAT_S = 0.5
"""Longest time between two heartbeats, and the longest wait in the inbox."""
END_TIMEOUT_MS = 30_000
"""How long a node waits for the EndAck of each of its out-edges."""
MIN_TENSOR_BYTES = 64 * 1024
"""The receive bound of a node whose messages are all tiny; the headers' own limit."""


class Stopped(Exception):
    """The launcher asked this node to stop, or is gone."""


def transport_config(topology: Topology, largest_tensor: int) -> TransportConfig:
    """The topology's transport settings, made safe for the core's flow control.

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
    bound = max(largest_tensor, MIN_TENSOR_BYTES)
    config.max_msg_bytes = min(config.max_msg_bytes, bound)
    config.limits = replace(config.limits, max_tensor_bytes=min(config.limits.max_tensor_bytes, bound),
                            max_message_bytes=min(config.limits.max_message_bytes, 2 * bound))
    return config


class Runtime:
    """Sockets, metrics and liveness of one node; it knows nothing of learning.

    A link holds sent tensors zero-copy until their time comes: nothing here or in the core
    modifies a tensor in place after sending it. kernel_bandwidth: the network (`--hosts
    netns`) shapes the bandwidth between hosts, so links here only delay.
    """

    def __init__(self, topology: Topology, name: str, control: str | None, run_dir: Path):
        """Open the control connection and say Hello at once, so the launcher hears from the
        node while it builds its core; `connect` opens the mesh's sockets after that."""
        self.topology = topology
        self.name = name
        self.context = zmq.Context()
        self.control = (Peer(control, name, transport_config(topology, 0), self.context)
                        if control else None)
        self.inbox: Inbox | None = None
        self.peers: dict[str, Peer | Link] = {}
        self.parent = os.getppid()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = (run_dir / f"{name}.jsonl").open("w")
        self.started = time.monotonic()
        self.last_report = 0.0
        self.next_beat = 0.0
        self.last_progress = -1
        self.control_seq = 0
        self.rejected_by_peer: Counter[str] = Counter()
        self.say(wire.Hello(name, os.getpid(), socket.gethostname(), topology.nodes[name].address))

    def connect(self, largest_tensor: int, kernel_bandwidth: bool = False) -> None:
        """Bind the inbox and connect a peer, through the edge's link, to every neighbour."""
        topology, name = self.topology, self.name
        config = transport_config(topology, largest_tensor)
        self.inbox = Inbox(topology.nodes[name].address, name, config, self.context)
        neighbours = {e.dst for e in topology.outputs(name)} | {e.src for e in topology.inputs(name)}
        self.peers = {n: link_to(topology, name, n,
                                 Peer(topology.nodes[n].address, name, config, self.context),
                                 kernel_bandwidth)
                      for n in sorted(neighbours)}

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
        if force or now - self.last_report >= 0.5:
            self.last_report = now
            self.metrics.flush()
            self.report(values)

    def report(self, values: dict) -> None:
        live = {k: v for k, v in values.items()
                if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k != "node"}
        self.say(wire.Metrics(self.name, int(values.get("step", 0)), live))

    def recv(self) -> Envelope | None:
        return self.inbox.recv(int(HEARTBEAT_S * 1000))

    def beat(self, core: Core) -> None:
        """Every HEARTBEAT_S: heartbeat, a `waiting` record when idle, and a look at the control
        connection for Stop (raised as Stopped, as is the launcher's death)."""
        now = time.monotonic()
        if now < self.next_beat or self.control is None:
            return
        self.next_beat = now + HEARTBEAT_S
        if os.getppid() != self.parent:
            raise Stopped("launcher is gone")
        while (message := self.control.recv(0)) is not None:
            if isinstance(message, wire.Stop):
                raise Stopped(message.reason)
        progress = core.counters.progress
        self.say(wire.Heartbeat(self.name, progress, time.time()))
        if progress == self.last_progress:
            self.report({"event": "waiting", "progress": progress, "waiting_for": core.waiting_for()})
        self.last_progress = progress

    def execute(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.peers[action.node].send(action.message)
            elif isinstance(action, Record):
                self.record(action.values, action.force)
            elif isinstance(action, Acknowledge):
                self.inbox.send(action.node, wire.EndAck(action.end.edge, action.end.seq))
            elif isinstance(action, EndEdge):
                if not self.peers[action.node].end(action.edge, action.count, END_TIMEOUT_MS):
                    raise RuntimeError(f"node {self.name}: no EndAck from {action.node} for "
                                       f"{action.edge} within {END_TIMEOUT_MS / 1000:.0f} s")
            elif isinstance(action, Reject):
                self.rejected_by_peer[action.peer] += 1
                count = self.rejected_by_peer[action.peer]
                if count <= 10 or count % 1000 == 0:  # a flooding peer must not flood the log
                    log.warning("node %s: rejected %s #%d from peer %r: %s", self.name,
                                action.kind, count, action.peer, action.reason)
            else:
                raise TypeError(f"node {self.name}: unknown action {action!r}")

    def finish(self, status: str, core: Core | None) -> None:
        """Report the final counters and flush them to the launcher before exiting."""
        counters = core.state_dict()["counters"] if core is not None else {}
        self.record({"event": "final", "status": status, **counters,
                     "samples_per_s": core.rate() if core is not None else 0.0,
                     "bad_messages": self.inbox.bad_messages if self.inbox is not None else 0,
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
             kernel_bandwidth: bool = False) -> int:
    """Run one node to the end of its data; returns the process exit code."""
    torch.set_num_threads(topology.nodes[name].threads)
    runtime = Runtime(topology, name, control, run_dir)
    status, code, core = "done", 0, None
    try:
        found = probe(topology)
        core = build_core(topology, name, time.monotonic, found)
        runtime.connect(largest_tensor(topology, name, found), kernel_bandwidth)
        runtime.say(wire.Ready(name))
        runtime.execute(core.advance())
        while not core.finished:
            envelope = runtime.recv()
            if envelope is not None:
                runtime.execute(core.receive(envelope.peer, envelope.message))
            runtime.beat(core)
    except Stopped as stop:
        status, code = f"stopped: {stop}", 130
    except Exception as error:
        status = f"error: {type(error).__name__}: {error}"
        runtime.say(wire.Error(name, status))
        raise
    finally:
        runtime.finish(status, core)
        runtime.close()
    return code
