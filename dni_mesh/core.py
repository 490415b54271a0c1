"""The node core: one node's event logic, with no sockets and no clock of its own.

A driver (the mesh runtime in `dni_mesh.node`, the in-process reference in
`dni_mesh.reference`) feeds a core the messages that reach its node, `receive(peer, message)`,
and carries out the actions it returns: `Send` a message to a node, `Acknowledge` an End,
`EndEdge` (this node's output on an edge is complete), `Record` a metrics line, and `Reject`
(a message was counted and dropped; the driver may log why). Every received message is checked
against the node's `Wiring` before anything is kept: a message that does not fit is rejected,
never held, so no peer can make a node grow, stall or end early by what it sends.

Flow control (protocols/flow-v1.md): a producer keeps at most `window` outputs in flight, each
waiting for an answer from every consumer (a Gradient, or a bare credit when no gradient is
due). A consumer answers each activation exactly once, so an in-edge never carries more than
its producer's window of seqs beyond the consumer's next step: that range is all it accepts.
Steps are numbered by seq, the source's batch counter, the same on every edge, for train and
eval batches alike. End(edge, position) closes an edge once every output on it was answered; the
consumer acknowledges it only when position is where the edge got to.

A node restarted from its checkpoint rejoins a running mesh (`rejoin`): it tells every
neighbour, each neighbour expires what it had in flight with it and answers with its position
on the edge, and the node resumes at the furthest of them. What was in flight is lost, never
waited for: a producer counts it `expired`, and a consumer skips the seqs its producer will
never send (answering the other producers of those seqs with zeros: they learn nothing from it).

Complete unlock: a node with a trigger edge from the source takes seq t's batch x there and
steps on its synthetic input I(x) at once (`Stage.synthetic_step`), up to `window` seqs ahead of
the answers it waits for; the real step of seq t, when its input arrives, only makes the output
and the answers and fits I. The trigger edge is answered with the real step, so at window 1 the
events come in one order: synthetic step t, real step t, the answer to t, synthetic step t + 1.
"""
from __future__ import annotations

import copy
import enum
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Union

import torch
from torch import Tensor

from dni_mesh import wire
from dni_mesh.checkpoint import CheckpointPolicy
from dni_mesh.language_model import IGNORE, LanguageModel, bits_per_token, perplexity
from dni_mesh.stage import Stage, StepResult


class EdgeKind(enum.Enum):
    """What an in-edge brings."""
    DATA = "data"        # an input of the node's module
    TRIGGER = "trigger"  # the source's batch, for the node's synthetic input I(x)


class Gather(enum.Enum):
    """What a node that ticks once every k seqs takes from an in-edge at its step."""
    LATEST = "latest"  # the group's last activation; the others are answered at once, with zeros
    STACK = "stack"    # all k activations, stacked on dimension 1 ([batch, k, ...])


@dataclass(frozen=True)
class InEdge:
    """An edge into the node, as the node's core checks it."""
    name: str
    src: str
    window: int              # the producer's window: how far past the next step its seqs reach
    needs_grad: bool         # the producer trains (it is not the source): answer with dh
    shape: tuple[int, ...]   # one sample of the activation
    dtype: torch.dtype
    gather: Gather = Gather.LATEST  # with tick > 1
    kind: EdgeKind = EdgeKind.DATA


@dataclass(frozen=True)
class OutEdge:
    name: str
    dst: str


@dataclass(frozen=True)
class Wiring:
    """What a node's core knows of the mesh around it: enough to check every message."""
    node: str
    inputs: tuple[InEdge, ...]     # in the order the module takes them
    outputs: tuple[OutEdge, ...]
    window: int                    # outputs in flight at most (1 makes a node locked)
    trains: bool                   # answers to its outputs carry gradients (False: the source)
    batch_size: int                # the largest batch an activation may carry
    num_classes: int               # labels lie in [0, num_classes)
    label_shape: tuple[int, ...] = ()  # one sample's labels: a class, or (T,) next tokens
                                       # of a chunk (where IGNORE marks a token not scored)
    tick: int = 1  # the node steps once every `tick` seqs, on each group's last one (a head)


# Actions: what a driver does for the core.
@dataclass(frozen=True)
class Send:
    node: str
    message: wire.Message


@dataclass(frozen=True)
class Acknowledge:
    """Answer the producer's End with EndAck: every message before it was taken."""
    node: str
    end: wire.End


@dataclass(frozen=True)
class EndEdge:
    """Send End(edge, count) to node and wait for its EndAck: the edge is complete."""
    node: str
    edge: str
    count: int


@dataclass(frozen=True)
class Record:
    """A metrics line; `force` asks the driver to pass it on now rather than rate-limited."""
    values: dict
    force: bool = False


@dataclass(frozen=True)
class Reject:
    """A message was counted and dropped, and why."""
    peer: str
    kind: str
    reason: str


@dataclass(frozen=True)
class Save:
    """Checkpoint this state, the node's as it stands before seq: every node of the mesh saves
    at the same seqs, so a mesh resumes from one consistent cut (`Core.checkpoint`)."""
    seq: int
    state: dict  # a copy: the node goes on changing its own


Action = Union[Send, Acknowledge, EndEdge, Record, Reject, Save]


@dataclass
class Counters:
    """What a core reports about itself. progress grows with every event that moves the node
    on (a message accepted, a batch sent): a node whose progress stops is stuck."""
    steps: int = 0
    eval_batches: int = 0
    samples: int = 0
    unexpected: int = 0    # valid messages of a kind a node does not take
    rejected: int = 0      # messages of a kind it takes that do not fit its wiring or state
    expired: int = 0       # steps or messages lost to a restart (this node's or a neighbour's)
    progress: int = 0


@dataclass
class InFlight:
    """An output waiting for its consumers' answers, and their summed gradient."""
    phase: str
    shape: tuple[int, ...]
    waiting: set[str]
    grad: Tensor | None = None


class Outputs:
    """The pending table of a producing node: at most `window` outputs in flight."""

    def __init__(self, wiring: Wiring):
        self.wiring = wiring
        self.edges = {edge.name: edge for edge in wiring.outputs}
        self.pending: dict[int, InFlight] = {}
        self.sent = 0  # the position of every out-edge: one past the last seq sent down it

    def full(self) -> bool:
        return len(self.pending) >= self.wiring.window

    def send(self, seq: int, h: Tensor, labels: Tensor | None, phase: str) -> list[Action]:
        h = h.detach().cpu()
        labels = labels.cpu() if labels is not None else None
        self.pending[seq] = InFlight(phase, tuple(h.shape), set(self.edges))
        self.sent = seq + 1
        return [Send(edge.dst, wire.Activation(edge.name, seq, h, labels, phase))
                for edge in self.edges.values()]

    def answer(self, peer: str, message: wire.Gradient) -> InFlight | str | None:
        """Take a consumer's answer: the entry once every consumer has answered, None while
        some still owe theirs, or the reason the answer does not fit (to reject it)."""
        edge = self.edges.get(message.edge)
        if edge is None:
            return f"no out-edge {message.edge!r} at node {self.wiring.node}"
        if peer != edge.dst:
            return f"edge {edge.name} is answered by {edge.dst!r}, not by this peer"
        entry = self.pending.get(message.seq)
        if entry is None or edge.name not in entry.waiting:
            return f"no output seq {message.seq} on {edge.name} waits for an answer"
        dh = message.dh
        if dh is None and entry.phase == "train" and self.wiring.trains:
            return f"seq {message.seq} on {edge.name} is a training output: it needs its gradient"
        if dh is not None:
            if entry.phase != "train" or not self.wiring.trains:
                return f"seq {message.seq} on {edge.name} takes a bare credit, not a gradient"
            if tuple(dh.shape) != entry.shape or not dh.is_floating_point():
                return (f"gradient for seq {message.seq} on {edge.name} has {dh.dtype} "
                        f"{list(dh.shape)}, the output was {list(entry.shape)}")
        entry.waiting.discard(edge.name)
        if dh is not None:
            entry.grad = dh.clone() if entry.grad is None else entry.grad + dh
        if entry.waiting:
            return None
        return self.pending.pop(message.seq)

    def expire(self, edge: str) -> list[tuple[int, InFlight]]:
        """Stop waiting for edge's consumer (it restarted): the entries that no longer wait for
        anyone, to complete with what the other consumers answered."""
        done = []
        for seq, entry in list(self.pending.items()):
            entry.waiting.discard(edge)
            if not entry.waiting:
                done.append((seq, self.pending.pop(seq)))
        return done

    def waiting_for(self) -> str:
        if not self.pending:
            return "nothing"
        seq = min(self.pending)
        edges = ", ".join(f"{name} from {self.edges[name].dst}" for name in sorted(self.pending[seq].waiting))
        return f"the answer to seq {seq} on {edges}"

    def end(self) -> list[Action]:
        return [EndEdge(edge.dst, edge.name, self.sent) for edge in self.edges.values()]


@dataclass
class EvalPass:
    """A head's loss and accuracy over one pass of the test set. Batches without labels are
    evaluated but counted apart: accuracy and loss are over the labels scored only (a sample's
    one class, or each scored token of a chunk)."""
    batches: int = 0
    samples: int = 0
    labelled: int = 0  # labels scored
    correct: int = 0
    loss_sum: float = 0.0
    started: float = 0.0

    def add(self, result: StepResult, n: int, now: float) -> None:
        if not self.batches:
            self.started = now
        self.batches += 1
        self.samples += n
        if result.correct is not None:
            self.labelled += result.scored
            self.correct += result.correct
            self.loss_sum += result.loss * result.scored

    def result(self) -> dict:
        values = {"test_samples": self.samples, "test_labelled": self.labelled}
        if self.labelled:
            values.update(test_accuracy=self.correct / self.labelled,
                          test_loss=self.loss_sum / self.labelled)
        return values


@dataclass
class TrainClock:
    """Training throughput, with evaluation passes taken out of the wall time."""
    first: float | None = None
    paused: float = 0.0
    samples: int = 0

    def tick(self, n: int, now: float) -> None:
        if self.first is None:
            self.first = now
        else:
            self.samples += n  # the first batch starts the clock

    def rate(self, now: float) -> float:
        if self.first is None:
            return 0.0
        elapsed = now - self.first - self.paused
        return self.samples / elapsed if elapsed > 0 else 0.0


Clock = Callable[[], float]


class Core:
    """What every node's core shares: counters, the pending table of its outputs, the clock,
    and the dispatch of received messages."""

    def __init__(self, wiring: Wiring, clock: Clock, checkpoints: CheckpointPolicy | None = None):
        self.wiring = wiring
        self.clock = clock
        self.checkpoints = checkpoints
        self.counters = Counters()
        self.outputs = Outputs(wiring)
        self.train_clock = TrainClock()
        self.finished = False
        self.last_phase = "train"  # of the seq before the next one
        self.rejoining: set[str] = set()  # edges whose neighbour has not told us its position
        self.positions: dict[str, int] = {}  # what they told us
        self.resume_seq = 0  # where this node's checkpoint would resume

    def receive(self, peer: str, message: wire.Message) -> list[Action]:
        """Take one message from peer (the transport's identity of the sender); the actions
        that follow, including any steps the message made possible."""
        if isinstance(message, wire.Rejoin):
            result = self.take_rejoin(peer, message)
            if not isinstance(result, str):
                return result
            self.counters.rejected += 1
            return [Reject(peer, message.KIND, result)]
        edge = getattr(message, "edge", None)
        if edge in self.rejoining and self.side(peer, edge) is not None:
            self.counters.expired += 1  # meant for this node's previous process
            return []
        if isinstance(message, wire.Activation):
            late = self.take_late(peer, message)
            if late is not None:
                return late
            problem = self.take_activation(peer, message)
        elif isinstance(message, wire.Gradient):
            answered = self.outputs.answer(peer, message)
            problem = answered if isinstance(answered, str) else None
            if problem is None:
                self.counters.progress += 1
                if answered is not None:
                    return [*self.learn(message.seq, answered), *self.advance()]
        elif isinstance(message, wire.End):
            problem = self.take_end(peer, message)
            if problem is None:
                return [Acknowledge(peer, message), *self.advance()]
        else:
            self.counters.unexpected += 1
            return [Reject(peer, message.KIND, f"node {self.wiring.node} takes no {message.KIND!r}")]
        if problem is not None:
            self.counters.rejected += 1
            return [Reject(peer, message.KIND, problem)]
        return self.advance()

    def take_activation(self, peer: str, message: wire.Activation) -> str | None:
        return f"node {self.wiring.node} has no in-edges"

    def take_late(self, peer: str, message: wire.Activation) -> list[Action] | None:
        """An activation of a seq this node skipped when it or a neighbour rejoined, answered
        at once (`unused`); None for any other."""
        return None

    def side(self, peer: str, edge: str) -> str | None:
        """"out" or "in" when edge joins this node to peer, else None."""
        out = self.outputs.edges.get(edge)
        return "out" if out is not None and out.dst == peer else None

    def rejoin(self, checkpoint_seq: int) -> list[Action]:
        """This node was restarted (from its checkpoint saved before checkpoint_seq, or from
        scratch at 0): ask every neighbour where it stands; nothing moves until all answer."""
        self.resume_seq = checkpoint_seq
        edges = [(edge.dst, edge.name) for edge in self.outputs.edges.values()] + self.in_edges()
        self.rejoining = {name for _, name in edges}
        return [Send(node, wire.Rejoin(name, checkpoint_seq)) for node, name in edges]

    def in_edges(self) -> list[tuple[str, str]]:
        return []

    def take_rejoin(self, peer: str, message: wire.Rejoin) -> list[Action] | str:
        side = self.side(peer, message.edge)
        if side is None:
            return f"{message.edge!r} is no edge between {self.wiring.node} and this peer"
        if message.edge in self.rejoining:  # a neighbour's answer to our own rejoin
            self.rejoining.discard(message.edge)
            self.positions[message.edge] = message.seq
            self.answered(message.edge, message.seq)
            if self.rejoining:
                return []
            seq = max([self.resume_seq, *self.positions.values()])
            actions = self.resume_at(seq)
            return [Record({"event": "rejoined", "seq": seq, "checkpoint_seq": self.resume_seq,
                            "steps": self.counters.steps}, force=True), *actions, *self.advance()]
        before = self.counters.expired
        if side == "out":  # its consumer restarted: what it owed us will never come
            actions, position = [], self.outputs.sent
            for seq, entry in self.outputs.expire(message.edge):
                self.counters.expired += 1
                actions += self.learn(seq, entry)
        else:
            actions, position = [], self.reopen(message.edge)
        return [*actions, Send(peer, wire.Rejoin(message.edge, position)),
                Record({"event": "peer_rejoined", "peer": peer,
                        "expired": self.counters.expired - before}, force=True), *self.advance()]

    def reopen(self, edge: str) -> int:
        """Its producer restarted: the position to tell it; it may skip ahead of it."""
        raise NotImplementedError

    def answered(self, edge: str, position: int) -> None:
        """While rejoining: a neighbour told this node its position on edge."""

    def resume_at(self, seq: int) -> list[Action]:
        """Every neighbour answered this node's rejoin: go on from seq."""
        self.outputs.sent = seq
        return []

    def take_end(self, peer: str, message: wire.End) -> str | None:
        return f"node {self.wiring.node} has no in-edges"

    def learn(self, seq: int, entry: InFlight) -> list[Action]:
        """Every consumer answered output seq."""
        return []

    def advance(self) -> list[Action]:
        """Whatever can be done now without another message."""
        raise NotImplementedError

    def rate(self) -> float:
        return self.train_clock.rate(self.clock())

    def checkpoint(self, seq: int, phase: str) -> list[Action]:
        """Save before training seq when the policy says so: every `every` seqs and after each
        evaluation pass, never inside one (its partial results are not state). Every node sees
        the same phases at the same seqs, so all of them save at the same seqs."""
        policy, after_eval = self.checkpoints, self.last_phase != "train"
        self.last_phase = phase
        if policy is None or phase != "train" or seq == 0 or not (
                policy.due(seq) or (after_eval and policy.due(seq, evaluation=True))):
            return []
        return [Save(seq, copy.deepcopy(self.checkpoint_state()))]

    def checkpoint_state(self) -> dict:
        """All a node needs to resume: its position, and what it learned."""
        return {"core": self.state_dict()}

    def restore(self, state: dict) -> None:
        """Resume from `checkpoint_state` (as it was before the seq it was saved at)."""
        self.load_state_dict(state["core"])

    def waiting_for(self) -> str:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The core's position: counters and how far each edge got (plain numbers)."""
        return {"counters": asdict(self.counters), "sent": self.outputs.sent}

    def load_state_dict(self, state: dict) -> None:
        self.counters = Counters(**state["counters"])
        self.outputs.sent = int(state["sent"])


@dataclass(frozen=True)
class Batch:
    """One batch the source sends."""
    x: Tensor
    y: Tensor
    phase: str  # "train" or "eval"


@dataclass(frozen=True)
class EpochEnd:
    """The source has sent an epoch's training batches (its evaluation may follow)."""
    epoch: int


class SourceCore(Core):
    """The data source: sends every batch down every out-edge, `window` in flight at most."""

    def __init__(self, wiring: Wiring, data: Iterator[Batch | EpochEnd], clock: Clock,
                 checkpoints: CheckpointPolicy | None = None):
        super().__init__(wiring, clock, checkpoints)
        self.data = data
        self.exhausted = False
        self.seq = 0
        self.taken = 0  # items taken from data: where a resumed source skips to
        self.evaluating_since: float | None = None  # sending an evaluation pass since

    def advance(self) -> list[Action]:
        actions: list[Action] = []
        while not self.exhausted and not self.outputs.full() and not self.rejoining:
            item = next(self.data, None)
            if item is None:
                self.exhausted = True
            elif isinstance(item, EpochEnd):
                self.taken += 1
                actions.append(Record({"event": "epoch", "epoch": item.epoch, "sent": self.seq}, True))
            else:
                actions += self.checkpoint(self.seq, item.phase)  # a resumed source sends it again
                self.taken += 1
                actions += self.outputs.send(self.seq, item.x, item.y, item.phase)
                self.seq += 1
                self.counters.progress += 1
                now = self.clock()
                if item.phase == "train":
                    if self.evaluating_since is not None:  # evaluation time is not training time
                        self.train_clock.paused += now - self.evaluating_since
                        self.evaluating_since = None
                    self.counters.steps += 1
                    self.counters.samples += len(item.y)
                    self.train_clock.tick(len(item.y), now)
                    actions.append(Record({"event": "step", "step": self.counters.steps,
                                           "seq": self.seq - 1, "samples_per_s": self.rate()}))
                else:
                    self.evaluating_since = self.evaluating_since or now
                    self.counters.eval_batches += 1
        if self.exhausted and not self.outputs.pending and not self.finished:
            self.finished = True
            actions += self.outputs.end()
        return actions

    def waiting_for(self) -> str:
        if self.finished:
            return "nothing (finished)"
        if self.outputs.pending:
            return self.outputs.waiting_for()
        return "nothing (sending)"

    def resume_at(self, seq: int) -> list[Action]:
        """Skip the batches before seq: the mesh went on without them while this node was down."""
        while self.seq < seq and not self.exhausted:
            item = next(self.data, None)
            if item is None:
                self.exhausted = True
                break
            self.taken += 1
            if isinstance(item, Batch):
                self.seq += 1
                self.counters.expired += 1
        return super().resume_at(seq)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "seq": self.seq, "taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved seq; the caller gives `data` already past the items taken."""
        super().load_state_dict(state)
        self.seq = int(state["seq"])
        self.taken = int(state["taken"])


class StageCore(Core):
    """A stage or head: joins the activations of seq t from every in-edge, steps its Stage,
    sends the output downstream and the gradient (or a bare credit) upstream."""

    def __init__(self, wiring: Wiring, stage: Stage, clock: Clock,
                 checkpoints: CheckpointPolicy | None = None):
        super().__init__(wiring, clock, checkpoints)
        self.stage = stage
        self.inputs = {edge.name: edge for edge in wiring.inputs}
        self.arrived: dict[int, dict[str, wire.Activation]] = {}
        self.accepted = dict.fromkeys(self.inputs, 0)  # position per in-edge: next seq expected
        self.ended: set[str] = set()
        self.next_seq = 0
        self.eval = EvalPass()
        self.jumps: set[str] = set()  # in-edges whose producer rejoined and may skip ahead
        self.skipped: set[int] = set()  # seqs that will never be joined (a producer skipped them)
        self.late: dict[str, int] = {}  # in-edge -> seqs below this are answered, not stepped
        self.backlog: list[Action] = []  # answers owed for skipped seqs, sent at the next advance
        self.trigger = next((e.name for e in wiring.inputs if e.kind is EdgeKind.TRIGGER), None)
        self.synthetic_seq = 0  # complete unlock: the next seq to step on I(x)
        self.evaluating_at: int | None = None  # the last eval seq synthetic steps went past

    def open_edge(self, peer: str, name: str) -> InEdge | str:
        """The in-edge a message names, if peer is its producer and it has not ended; else why not."""
        edge = self.inputs.get(name)
        if edge is None:
            return f"no in-edge {name!r} at node {self.wiring.node}"
        if peer != edge.src:
            return f"edge {edge.name} is fed by {edge.src!r}, not by this peer"
        if edge.name in self.ended:
            return f"{edge.name} has ended"
        return edge

    def take_activation(self, peer: str, act: wire.Activation) -> str | None:
        edge = self.open_edge(peer, act.edge)
        if isinstance(edge, str):
            return edge
        if edge.name in self.jumps and act.seq >= self.accepted[edge.name]:
            # Its producer rejoined at act.seq: the seqs before it will never come on this edge.
            self.jumps.discard(edge.name)
            self.skip(range(self.accepted[edge.name], act.seq))
            self.accepted[edge.name] = act.seq
        else:  # while this node rejoins, its window starts at the producer's own position
            low = self.positions[edge.name] if self.rejoining else self.next_seq
            high = low + self.reach(edge)
            if not low <= act.seq < high:
                return f"seq {act.seq} on {edge.name} is outside the window [{low}, {high})"
        for name in self.ended:
            if act.seq >= self.accepted[name]:
                return (f"seq {act.seq} on {edge.name} can never be joined: {name} ended after "
                        f"{self.accepted[name]} activations")
        others = self.arrived.get(act.seq, {})
        if edge.name in others:
            return f"seq {act.seq} on {edge.name} arrived twice"
        problem = self.check_tensors(edge, act)
        if problem is None and others:
            first = next(iter(others.values()))
            if (first.phase, len(first.h)) != (act.phase, len(act.h)):
                problem = (f"seq {act.seq} on {edge.name} is a {act.phase} batch of {len(act.h)}, "
                           f"{first.edge} brought a {first.phase} batch of {len(first.h)}")
        if problem is not None:
            return problem
        self.accepted[edge.name] += 1
        if edge.gather is Gather.LATEST and (act.seq + 1) % self.wiring.tick:
            # A group's earlier activation on a "latest" edge: never stepped on, answered now.
            self.backlog.append(self.unused(act))
            self.counters.progress += 1
            return None
        self.arrived.setdefault(act.seq, {})[edge.name] = act
        self.counters.progress += 1
        return None

    def check_tensors(self, edge: InEdge, act: wire.Activation) -> str | None:
        h, labels, batch = act.h, act.labels, len(act.h) if act.h.dim() else 0
        if tuple(h.shape[1:]) != edge.shape or h.dtype != edge.dtype or h.dim() == 0:
            return (f"activation on {edge.name} is {h.dtype} {list(h.shape)}, expected "
                    f"{edge.dtype} [batch, {', '.join(map(str, edge.shape))}]")
        if not 1 <= batch <= self.wiring.batch_size:
            return f"batch of {batch} on {edge.name}, expected 1 to {self.wiring.batch_size}"
        if labels is None:
            return f"training batch on {edge.name} without labels" if act.phase == "train" else None
        expected = (batch, *self.wiring.label_shape)
        if tuple(labels.shape) != expected or labels.dtype != torch.int64:
            return (f"labels on {edge.name} are {labels.dtype} {list(labels.shape)}, expected "
                    f"int64 {list(expected)}")
        scored = labels[labels != IGNORE] if self.wiring.label_shape else labels
        if scored.numel() and not (0 <= int(scored.min()) and int(scored.max()) < self.wiring.num_classes):
            return f"labels on {edge.name} outside [0, {self.wiring.num_classes})"
        return None

    def take_end(self, peer: str, end: wire.End) -> str | None:
        edge = self.open_edge(peer, end.edge)
        if isinstance(edge, str):
            return edge
        if end.seq != self.accepted[edge.name]:
            return f"End of {edge.name} counts {end.seq} activations, {self.accepted[edge.name]} arrived"
        beyond = [seq for seq in self.arrived if seq >= end.seq]
        if beyond:
            return f"End of {edge.name} after {end.seq} activations, but seq {max(beyond)} arrived on another edge"
        self.ended.add(edge.name)
        self.counters.progress += 1
        return None

    def reach(self, edge: InEdge) -> int:
        """How far past this node's next seq the producer on edge may be. Its window counts the
        outputs not yet answered: on a "stack" edge every seq of a group waits for the step, on
        a "latest" edge only each group's last does (the others are answered on arrival)."""
        tick = self.wiring.tick
        return edge.window * tick if edge.gather is Gather.LATEST else edge.window + tick - 1

    def group(self) -> range:
        """The seqs of the next step: one, or a tick's worth."""
        return range(self.next_seq, self.next_seq + self.wiring.tick)

    def ready(self) -> bool:
        last = self.group()[-1]
        return len(self.arrived.get(last, ())) == len(self.inputs) and all(
            edge.name in self.arrived.get(seq, ()) for edge in self.inputs.values()
            if edge.gather is Gather.STACK for seq in self.group())

    def gather(self) -> tuple[list[wire.Activation], list[Tensor]]:
        """Take the next step's activations out of `arrived`: the last seq's, and the inputs
        (stacked over the group on "stack" edges)."""
        group = self.group()
        taken = [self.arrived.pop(seq, {}) for seq in group]
        lasts = [taken[-1][name] for name in self.inputs]
        inputs = [torch.stack([aligned(t[edge.name].h) for t in taken], dim=1)
                  if edge.gather is Gather.STACK and self.wiring.tick > 1 else aligned(last.h)
                  for edge, last in zip(self.inputs.values(), lasts)]
        return lasts, inputs

    def side(self, peer: str, edge: str) -> str | None:
        inbound = self.inputs.get(edge)
        return "in" if inbound is not None and inbound.src == peer else super().side(peer, edge)

    def in_edges(self) -> list[tuple[str, str]]:
        return [(edge.src, edge.name) for edge in self.inputs.values()]

    def skip(self, seqs: range) -> None:
        """These seqs will never be joined: answer what other edges brought of them (bare
        credits) and step over them."""
        for seq in seqs:
            self.counters.expired += 1
            for act in self.arrived.pop(seq, {}).values():
                self.backlog.append(self.unused(act))
        self.skipped.update(seqs)

    def unused(self, act: wire.Activation) -> Send:
        """The answer to an activation no step will take (skipped, expired, or not the latest
        of a group): zeros where its producer is owed a gradient, so that it learns nothing
        from this consumer for it, else a bare credit."""
        edge = self.inputs[act.edge]
        due = edge.needs_grad and act.phase == "train"
        return Send(edge.src, wire.Gradient(edge.name, act.seq, torch.zeros_like(act.h) if due else None))

    def pass_skipped(self) -> None:
        while self.next_seq in self.skipped:
            self.skipped.discard(self.next_seq)
            self.next_seq += 1

    def take_late(self, peer: str, act: wire.Activation) -> list[Action] | None:
        edge = self.inputs.get(act.edge)
        if edge is None or edge.src != peer or act.seq != self.accepted[edge.name] or not (
                act.seq in self.skipped or act.seq < self.late.get(edge.name, 0)):
            return None
        self.accepted[edge.name] += 1
        self.counters.expired += 1
        return [self.unused(act)]

    def reopen(self, edge: str) -> int:
        self.jumps.add(edge)
        return self.accepted[edge]

    def answered(self, edge: str, position: int) -> None:
        if edge in self.inputs:
            self.accepted[edge] = position

    def resume_at(self, seq: int) -> list[Action]:
        """Producers below seq send what this node answers without stepping (`take_late`),
        and what they sent of it while the others' answers came is answered now."""
        self.next_seq = seq
        self.late = dict.fromkeys(self.inputs, seq)
        for early in [s for s in self.arrived if s < seq]:
            for act in self.arrived.pop(early).values():
                self.counters.expired += 1
                self.backlog.append(self.unused(act))
        return super().resume_at(seq)

    def advance(self) -> list[Action]:
        actions, self.backlog = self.backlog, []
        self.pass_skipped()
        while True:
            self.synthetic_steps()
            if not (self.ready() and not self.outputs.full() and not self.rejoining):
                break
            acts, inputs = self.gather()
            actions += self.step(self.group()[-1], acts, inputs)
            self.next_seq += self.wiring.tick
            self.pass_skipped()
        if len(self.ended) == len(self.inputs) and self.wiring.tick > 1:
            actions += self.drop_partial_group()
        done = len(self.ended) == len(self.inputs) and not self.arrived and not self.outputs.pending
        if done and not self.finished:
            self.finished = True
            actions += self.close_eval()
            actions += self.outputs.end()
        return actions

    def synthetic_steps(self) -> None:
        """Complete unlock: train on I(x) for each training batch the trigger edge brought, in
        seq order, while the steps ahead of the real ones and the outputs in flight together
        stay within the window."""
        if self.trigger is None or self.rejoining:
            return
        self.synthetic_seq = max(self.synthetic_seq, self.next_seq)
        while len(self.outputs.pending) + self.synthetic_seq - self.next_seq < self.wiring.window:
            if self.synthetic_seq in self.skipped:  # never joined: nothing to learn from
                self.synthetic_seq += 1
                continue
            act = self.arrived.get(self.synthetic_seq, {}).get(self.trigger)
            if act is None:
                return
            if act.phase != "train":
                self.evaluating_at = self.synthetic_seq
            elif self.evaluating_at is not None and self.next_seq <= self.evaluating_at:
                return  # no update before the evaluation pass it follows is done
            else:
                self.stage.synthetic_step(aligned(act.h), act.labels)
                self.counters.progress += 1
            self.synthetic_seq += 1

    def drop_partial_group(self) -> list[Action]:
        """The data ended inside a group: it is never stepped; answer what it brought."""
        actions = []
        for seq, acts in sorted(self.arrived.items()):
            self.counters.expired += 1
            actions += [self.unused(a) for a in acts.values()]
        self.arrived.clear()
        return actions

    def step(self, seq: int, acts: list[wire.Activation], inputs: list[Tensor]) -> list[Action]:
        """Step on seq (a group's last, when the node ticks every few seqs) with the inputs
        of every in-edge; acts are the in-edges' activations of seq."""
        phase, n = acts[0].phase, len(acts[0].h)
        labels = next((a.labels for a in acts if a.labels is not None), None)
        if self.trigger is not None:  # the source's batch is for I, not for the module
            x, inputs = inputs[-1], inputs[:-1]
        if phase != "train":
            self.last_phase = phase
            if not self.eval.batches:
                self.stage.reset_eval_state()  # a pass reads its split from the start
            result = self.stage.evaluate(inputs, labels)
            actions = self.send_output(seq, result, labels, phase)
            self.eval.add(result, n, self.clock())
            self.counters.eval_batches += 1
            return actions + self.reply(seq, None)
        actions = self.close_eval()
        actions += self.checkpoint(self.next_seq, phase)
        self.train_clock.tick(n, self.clock())
        needs_grad = [edge.needs_grad for edge in self.inputs.values() if edge.kind is EdgeKind.DATA]
        fitted = self.stage.fit_input(x, inputs[0]) if self.trigger is not None else None
        result = self.stage.forward(seq, inputs, labels, needs_grad)
        actions += self.send_output(seq, result, labels, phase)
        self.counters.steps += 1
        self.counters.samples += n
        if result.input_grads is not None or not self.wiring.outputs:
            actions += self.reply(seq, result.input_grads)
        record = {"event": "step", "step": self.counters.steps, "seq": seq,
                  "samples_per_s": self.rate()}
        if result.loss is not None:
            record["loss"] = result.loss
        if fitted is not None:
            record.update(input_loss=fitted, synthetic_ahead=self.synthetic_seq - seq - 1)
        if self.stage.gated:
            record["trust"] = self.stage.trust()
        return actions + [Record(record)]

    def send_output(self, seq: int, result: StepResult, labels: Tensor | None,
                    phase: str) -> list[Action]:
        if result.output is None:
            return []
        return self.outputs.send(seq, result.output, labels, phase)

    def learn(self, seq: int, entry: InFlight) -> list[Action]:
        """All consumers answered a training output: fit the synthesizer or do the locked update.
        With no gradient at all (its consumers restarted) the step is forgotten, and a step
        that still owed its input gradients answers its producers with zeros."""
        if entry.phase != "train":
            return []
        if entry.grad is None:
            self.counters.expired += 1
            owed = self.stage.forget(seq)
            return self.reply(seq, owed) if owed is not None else []
        result = self.stage.backward(seq, entry.grad)
        actions = self.reply(seq, result.input_grads) if result.input_grads is not None else []
        if result.sg_loss is not None:
            actions.append(Record({"event": "fit", "step": self.counters.steps, "seq": seq,
                                   "sg_loss": result.sg_loss, "samples_per_s": self.rate()}))
        return actions

    def reply(self, seq: int, grads: list[Tensor | None] | None) -> list[Action]:
        """Answer every in-edge for seq: its gradient where it needs one, else a bare credit.
        A "stack" edge of a ticking node is answered for each seq of the group, with its slice."""
        actions: list[Action] = []
        for i, edge in enumerate(self.inputs.values()):
            dh = grads[i] if grads is not None and edge.needs_grad else None
            if edge.gather is Gather.STACK and self.wiring.tick > 1:
                group = range(seq - self.wiring.tick + 1, seq + 1)
                actions += [Send(edge.src, wire.Gradient(edge.name, s, None if dh is None else
                                                         dh[:, j].contiguous().cpu()))
                            for j, s in enumerate(group)]
            else:
                actions.append(Send(edge.src, wire.Gradient(edge.name, seq, dh.cpu() if dh is not None else None)))
        return actions

    def close_eval(self) -> list[Action]:
        """An evaluation pass ends where training resumes or the data ends."""
        if not self.eval.batches:
            return []
        actions: list[Action] = []
        if self.stage.head:
            result = self.eval.result()
            if isinstance(self.stage.objective, LanguageModel) and "test_loss" in result:
                result.update(test_bits_per_token=bits_per_token(result["test_loss"]),
                              test_perplexity=perplexity(result["test_loss"]))
            actions.append(Record({"event": "eval", **result}, force=True))
        self.train_clock.paused += self.clock() - self.eval.started
        self.eval = EvalPass()
        return actions

    def waiting_for(self) -> str:
        if self.finished:
            return "nothing (finished)"
        if self.outputs.full():
            return self.outputs.waiting_for()
        here = self.arrived.get(self.next_seq, {})
        missing = [name for name in self.inputs if name not in self.ended and name not in here]
        if missing:
            edges = ", ".join(f"{name} from {self.inputs[name].src}" for name in missing)
            return f"activation seq {self.next_seq} on {edges}"
        return self.outputs.waiting_for()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "next_seq": self.next_seq, "accepted": dict(self.accepted),
                "synthetic_seq": self.synthetic_seq}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.next_seq = int(state["next_seq"])
        # Its steps ahead are in the weights saved; a checkpoint from before complete unlock has none.
        self.synthetic_seq = int(state.get("synthetic_seq", self.next_seq))
        # Every seq comes down every in-edge once: at a checkpoint each edge has brought next_seq
        # (the count saved may include seqs that arrived early and were lost with the process).
        self.accepted = dict.fromkeys(self.inputs, self.next_seq)

    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "stage": self.stage.state_dict()}

    def restore(self, state: dict) -> None:
        super().restore(state)
        self.stage.load_state_dict(state["stage"])


def aligned(t: Tensor) -> Tensor:
    """A received tensor, copied when its frame is not 64-byte aligned.

    CPU kernels pick code paths by alignment, and results differ in the last bits between them;
    computing on aligned memory makes a node's arithmetic match the single-process reference.
    """
    return t if t.data_ptr() % 64 == 0 else t.clone()
