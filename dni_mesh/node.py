"""The node runtime: one OS process that owns one node of a topology.

A node binds its inbox, connects a peer to every neighbour's inbox (and to the launcher's
control inbox, when there is one) and then reacts to messages:

- `source`: reads the data set and sends each batch, with its labels, down every out-edge.
- `stage` and `head`: take the activation for seq t from every in-edge, run the `Stage` step
  and send the output downstream and the gradient (or a bare credit) upstream.

Flow control is the pending table: a node keeps at most `window` of its outputs in flight,
waiting for every consumer's Gradient (a bare credit when no gradient is needed). Because a
consumer answers each activation exactly once and the node never exceeds its window, no inbox
ever holds more than `window` messages from one peer; with high-water marks above that, sends
never block for long and gradients are never dropped. Locked modes run with a window of 1,
which is what makes them locked. Evaluation batches flow the same way with phase "eval".

End of data travels as End on every edge, in order behind the last batch: a node ends once all
its in-edges have ended and all its outputs are answered, then ends its own out-edges.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import zmq

from dni_mesh import wire
from dni_mesh.build import build_source, build_stage
from dni_mesh.link import link_to
from dni_mesh.stage import Stage
from dni_mesh.topology import EdgeSpec, Topology
from dni_mesh.transport import BLOCK, Inbox, Peer, TransportConfig

log = logging.getLogger(__name__)

CONTROL_EDGE = "control"
LOCKED_MODES = ("backprop", "bp_lambda")


class Stopped(Exception):
    """The launcher asked this node to stop."""


@dataclass
class Pending:
    """An output in flight: which consumers have answered, and their summed gradient."""
    phase: str
    waiting: set[str]
    grad: torch.Tensor | None = None


@dataclass
class Counters:
    """What the node reports about itself; the launcher's summary lists these per node."""
    steps: int = 0
    eval_batches: int = 0
    samples: int = 0
    bad_messages: int = 0
    dropped_messages: int = 0
    unexpected: int = 0
    samples_per_s: float = 0.0


def transport_config(topology: Topology, window: int) -> TransportConfig:
    """The topology's transport settings, made safe for the runtime's flow control.

    Every kind blocks (the window, not dropping, bounds the queues) and the high-water marks
    leave room for a full window from each peer plus the control messages beside it.
    """
    config = TransportConfig(**topology.transport)
    config.policy = {kind: BLOCK for kind in config.policy}
    room = window + 4
    config.sndhwm = max(config.sndhwm, room)
    config.rcvhwm = max(config.rcvhwm, room)
    return config


class Runtime:
    """Sockets, metrics and liveness shared by every role.

    The peer to each neighbour goes through the emulated link of the edge between the two
    (`dni_mesh.link`); the launcher's control peer never does. kernel_bandwidth: the network
    (`--hosts netns`) shapes the bandwidth between hosts, so links here only delay.
    A link holds sent tensors zero-copy until their time comes: nothing here modifies a tensor
    in place after sending it.
    """

    def __init__(self, topology: Topology, name: str, control: str | None, run_dir: Path,
                 kernel_bandwidth: bool = False):
        self.topology = topology
        self.spec = topology.nodes[name]
        self.name = name
        self.window = 1 if self.spec.mode in LOCKED_MODES else self.spec.window
        self.config = transport_config(topology, max(node.window for node in topology.nodes.values()))
        self.context = zmq.Context()
        self.inbox = Inbox(self.spec.address, name, self.config, self.context)
        neighbours = {e.dst for e in topology.outputs(name)} | {e.src for e in topology.inputs(name)}
        peers = {n: Peer(topology.nodes[n].address, name, self.config, self.context)
                 for n in sorted(neighbours)}
        self.peers = {n: link_to(topology, name, n, peer, kernel_bandwidth) for n, peer in peers.items()}
        self.control = Peer(control, name, self.config, self.context) if control else None
        self.parent = os.getppid()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = (run_dir / f"{name}.jsonl").open("w")
        self.counters = Counters()
        self.started = time.monotonic()
        self.last_report = 0.0
        self.control_seq = 0
        self.say(wire.Hello(name, os.getpid(), socket.gethostname(), self.inbox.address))

    def say(self, message: wire.Message) -> None:
        """Send to the launcher, if there is one."""
        if self.control is not None:
            self.control.send(message)
            self.control_seq += 1

    def record(self, values: dict, force: bool = False) -> None:
        """Append a metrics line; forward to the launcher at most twice a second."""
        values = {"node": self.name, "time": round(time.monotonic() - self.started, 4), **values}
        self.metrics.write(json.dumps(values) + "\n")
        now = time.monotonic()
        if force or now - self.last_report >= 0.5:
            self.last_report = now
            self.metrics.flush()
            live = {k: v for k, v in values.items() if isinstance(v, (int, float, str)) and k != "node"}
            self.say(wire.Metrics(self.name, self.counters.steps, live))

    def recv(self, timeout_ms: int = 500) -> wire.Message | None:
        """The next message for the node's logic; control messages are handled here."""
        envelope = self.inbox.recv(timeout_ms)
        if self.control is not None and os.getppid() != self.parent:
            raise Stopped("launcher is gone")
        if envelope is None:
            self.say(wire.Heartbeat(self.name, self.counters.steps, time.time()))
            return None
        message = envelope.message
        if isinstance(message, wire.Stop):
            raise Stopped(message.reason)
        return message

    def send(self, node: str, message: wire.Message) -> None:
        self.peers[node].send(message)

    def finish(self, status: str) -> None:
        """Report the final counters and flush them to the launcher before exiting."""
        c = self.counters
        c.bad_messages = self.inbox.bad_messages
        c.dropped_messages = sum(p.dropped for p in self.peers.values())
        self.record({"event": "final", "status": status, **asdict(c)}, force=True)
        if self.control is not None:
            self.control.end(CONTROL_EDGE, self.control_seq, timeout_ms=5000)

    def close(self) -> None:
        self.metrics.close()
        for peer in self.peers.values():
            peer.close()
        if self.control is not None:
            self.control.close()
        self.inbox.close()
        self.context.term()


class Outputs:
    """The pending table of a producing node: outputs in flight until all consumers answer."""

    def __init__(self, runtime: Runtime, edges: list[EdgeSpec]):
        self.runtime = runtime
        self.edges = edges
        self.pending: dict[int, Pending] = {}
        self.sent = 0

    def full(self) -> bool:
        return len(self.pending) >= self.runtime.window

    def send(self, seq: int, h: torch.Tensor, labels: torch.Tensor | None, phase: str) -> None:
        h = h.detach().cpu()
        labels = labels.cpu() if labels is not None else None
        self.pending[seq] = Pending(phase, {e.name for e in self.edges})
        for edge in self.edges:
            self.runtime.send(edge.dst, wire.Activation(edge.name, seq, h, labels, phase))
        self.sent += 1

    def answer(self, message: wire.Gradient) -> Pending | None:
        """Take a consumer's answer; the entry once every consumer has answered, else None."""
        entry = self.pending.get(message.seq)
        if entry is None or message.edge not in entry.waiting:
            self.runtime.counters.unexpected += 1
            return None
        entry.waiting.discard(message.edge)
        if message.dh is not None:
            entry.grad = message.dh.clone() if entry.grad is None else entry.grad + message.dh
        if entry.waiting:
            return None
        return self.pending.pop(message.seq)

    def end(self) -> None:
        for edge in self.edges:
            if not self.runtime.peers[edge.dst].end(edge.name, self.sent, timeout_ms=30_000):
                raise RuntimeError(f"node {self.runtime.name}: no end-of-stream ack on {edge}")


def aligned(t: torch.Tensor) -> torch.Tensor:
    """A received tensor, copied when its frame is not 64-byte aligned.

    CPU kernels pick code paths by alignment, and results differ in the last bits between them;
    computing on aligned memory makes a node's arithmetic match the single-process reference.
    """
    return t if t.data_ptr() % 64 == 0 else t.clone()


def run_source(runtime: Runtime) -> None:
    """Send every epoch's training batches, then the test set at each evaluation point."""
    topology, data = runtime.topology, runtime.topology.data
    outputs = Outputs(runtime, topology.outputs(runtime.name))
    train, test = build_source(topology, "train"), build_source(topology, "test")
    seq = 0

    def emit(x: torch.Tensor, y: torch.Tensor, phase: str) -> None:
        nonlocal seq
        while outputs.full():
            drain(runtime, outputs)
        outputs.send(seq, x, y, phase)
        seq += 1

    for epoch in range(1, data.epochs + 1):
        train.set_epoch(epoch - 1)
        for batch, (x, y) in enumerate(train):
            if data.limit is not None and batch >= data.limit:
                break
            emit(x, y, "train")
            runtime.counters.steps += 1
            runtime.counters.samples += len(y)
        runtime.record({"event": "epoch", "epoch": epoch, "sent": seq}, force=True)
        if epoch == data.epochs or (data.eval_every and epoch % data.eval_every == 0):
            for x, y in test:
                emit(x, y, "eval")
                runtime.counters.eval_batches += 1
    while outputs.pending:
        drain(runtime, outputs)
    outputs.end()


def drain(runtime: Runtime, outputs: Outputs) -> None:
    """Wait for consumers' answers; a source ignores gradients (it has nothing to train)."""
    message = runtime.recv()
    if isinstance(message, wire.Gradient):
        outputs.answer(message)
    elif message is not None:
        runtime.counters.unexpected += 1


class StageRunner:
    """A stage or head: joins the activations of seq t from every in-edge and steps the Stage."""

    def __init__(self, runtime: Runtime, stage: Stage):
        self.runtime = runtime
        self.stage = stage
        topology, name = runtime.topology, runtime.name
        self.inputs = topology.inputs(name)
        self.needs_grad = [topology.nodes[e.src].role != "source" for e in self.inputs]
        self.outputs = Outputs(runtime, topology.outputs(name))
        self.arrived: dict[int, dict[str, wire.Activation]] = {}
        self.ended: set[str] = set()
        self.next_seq = 0
        self.eval = EvalPass()
        self.train_clock = TrainClock()

    def run(self) -> None:
        while True:
            while self.ready() and not self.outputs.full():
                self.step(self.next_seq, self.arrived.pop(self.next_seq))
                self.next_seq += 1
            if len(self.ended) == len(self.inputs) and not self.arrived and not self.outputs.pending:
                break
            message = self.runtime.recv()
            if message is not None:
                self.take(message)
        self.close_eval()
        self.outputs.end()

    def ready(self) -> bool:
        return len(self.arrived.get(self.next_seq, ())) == len(self.inputs)

    def take(self, message: wire.Message) -> None:
        if isinstance(message, wire.Activation):
            self.arrived.setdefault(message.seq, {})[message.edge] = message
        elif isinstance(message, wire.Gradient):
            entry = self.outputs.answer(message)
            if entry is not None and entry.phase == "train":
                self.learn(message.seq, entry)
        elif isinstance(message, wire.End):
            self.ended.add(message.edge)
        else:
            self.runtime.counters.unexpected += 1

    def step(self, seq: int, arrived: dict[str, wire.Activation]) -> None:
        acts = [arrived[e.name] for e in self.inputs]
        phase = acts[0].phase
        labels = next((a.labels for a in acts if a.labels is not None), None)
        train = phase == "train"
        if train:
            self.close_eval()
            self.train_clock.tick(len(acts[0].h))
        result = self.stage.forward(seq, [aligned(a.h) for a in acts], labels,
                                    needs_input_grad=self.needs_grad, train=train)
        if result.output is not None:
            self.outputs.send(seq, result.output, labels, phase)
        if not train:
            self.eval.add(result.loss, result.correct, len(acts[0].h))
            self.reply(seq, None)
            return
        counters = self.runtime.counters
        counters.steps += 1
        counters.samples += len(acts[0].h)
        if result.input_grads is not None or not self.outputs.edges:
            self.reply(seq, result.input_grads)
        self.runtime.record({"event": "step", "step": counters.steps, "seq": seq, "loss": result.loss,
                             "samples_per_s": self.train_clock.rate()})

    def learn(self, seq: int, entry: Pending) -> None:
        """All consumers answered a training output: fit the synthesizer or do the locked update."""
        if entry.grad is None:
            return
        result = self.stage.backward(seq, entry.grad)
        if result.input_grads is not None:
            self.reply(seq, result.input_grads)
        if result.sg_loss is not None:
            self.runtime.record({"event": "fit", "step": self.runtime.counters.steps, "seq": seq,
                                 "sg_loss": result.sg_loss, "samples_per_s": self.train_clock.rate()})

    def reply(self, seq: int, grads: list[torch.Tensor | None] | None) -> None:
        """Answer every in-edge for seq: its gradient where it needs one, else a bare credit."""
        for i, edge in enumerate(self.inputs):
            dh = grads[i] if grads is not None and self.needs_grad[i] else None
            self.runtime.send(edge.src, wire.Gradient(edge.name, seq, dh.cpu() if dh is not None else None))

    def close_eval(self) -> None:
        """An evaluation pass ends where training resumes or the data ends."""
        if self.eval.batches and self.stage.head:
            self.runtime.record({"event": "eval", **self.eval.result()}, force=True)
        if self.eval.batches:
            self.train_clock.pause(self.eval.wall())
            self.eval = EvalPass()


@dataclass
class EvalPass:
    """Accumulates a head's loss and accuracy over one pass of the test set."""
    batches: int = 0
    samples: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    started: float = 0.0

    def add(self, loss: float | None, correct: int | None, n: int) -> None:
        if not self.batches:
            self.started = time.monotonic()
        self.batches += 1
        self.samples += n
        if correct is not None:
            self.correct += correct
            self.loss_sum += (loss or 0.0) * n

    def wall(self) -> float:
        return time.monotonic() - self.started

    def result(self) -> dict:
        n = max(self.samples, 1)
        return {"test_samples": self.samples, "test_accuracy": self.correct / n,
                "test_loss": self.loss_sum / n}


@dataclass
class TrainClock:
    """Training throughput, with evaluation passes taken out of the wall time."""
    first: float | None = None
    paused: float = 0.0
    samples: int = 0

    def tick(self, n: int) -> None:
        if self.first is None:
            self.first = time.monotonic()
        else:
            self.samples += n  # the first batch starts the clock

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def rate(self) -> float:
        if self.first is None:
            return 0.0
        elapsed = time.monotonic() - self.first - self.paused
        return self.samples / elapsed if elapsed > 0 else 0.0


def run_node(topology: Topology, name: str, control: str | None, run_dir: Path,
             kernel_bandwidth: bool = False) -> int:
    """Run one node to the end of its data; returns the process exit code."""
    spec = topology.nodes[name]
    torch.set_num_threads(spec.threads)
    runtime = Runtime(topology, name, control, run_dir, kernel_bandwidth)
    status, code = "done", 0
    try:
        if spec.role == "source":
            run_source(runtime)
        else:
            runner = StageRunner(runtime, build_stage(topology, name))
            runner.run()
            runtime.counters.samples_per_s = runner.train_clock.rate()
    except Stopped as stop:
        status, code = f"stopped: {stop}", 130
    except Exception as error:
        status = f"error: {type(error).__name__}: {error}"
        runtime.say(wire.Error(name, status))
        raise
    finally:
        runtime.finish(status)
        runtime.close()
    return code
