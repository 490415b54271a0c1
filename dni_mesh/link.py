"""User-space link emulation: one-way delay, jitter and bandwidth on the way to one peer.

This kernel has no `tc netem`, so the conditions a topology's `links:` section asks for are
emulated here, at message granularity. A `Link` wraps a transport `Peer` with the same
send/end/close surface. `send` computes when the message would arrive over the emulated link and
queues it; a background thread hands it to the Peer at that moment. The thread owns the Peer from
then on (ZeroMQ sockets are not thread-safe), so `end` goes through the same queue and End leaves
after everything queued before it.

The schedule of message i (sent at t_i, s_i bytes = the sum of its wire frames):
- bandwidth r: a token bucket refilled at r with no burst allowance, i.e. the link serialises
  one message at a time: on_wire_i = max(t_i, on_wire_(i-1)) + s_i / r.
- delay d and jitter j, as netem writes them: due_i = on_wire_i + max(0, d + U(-j, j)), U drawn
  from a generator seeded by the topology's seed, the edge and the sender, so runs repeat.
- order is kept, as on one TCP connection: release_i = max(due_i, release_(i-1)). Jitter so
  delays a message behind a slower predecessor and never reorders.

The queue is bounded in messages: `send` blocks when it is full, which is backpressure like a
full socket buffer. Queued messages hold their tensors zero-copy (wire frames alias them), which is
safe because the node runtime never modifies a tensor in place after sending it: outputs are fresh
module results, gradients are fresh `.grad` tensors of per-step leaves, and the runtime sums
incoming gradients out of place.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
import zlib
from dataclasses import dataclass, field, replace

from dni_mesh import wire
from dni_mesh.topology import LinkSpec, Topology
from dni_mesh.transport import Peer, PeerTimeout

log = logging.getLogger(__name__)

SEND_SLICE_MS = 100
"""Longest single wait of the link thread inside the Peer, so that `close` is taken promptly."""


def link_seed(topology_seed: int, edge: str, sender: str) -> int:
    """The jitter seed of one direction of an edge: repeatable, and different per direction."""
    return zlib.crc32(f"{edge}|{sender}".encode(), topology_seed & 0xFFFFFFFF)


def message_bytes(message: wire.Message) -> int:
    """A message's size on the link: the sum of its wire frames."""
    return sum(memoryview(frame).nbytes for frame in wire.encode(message))


def host_pair_rates(topology: Topology) -> dict[frozenset[str], float]:
    """Mbit/s of the wire between every two hosts whose edges all set a bandwidth.

    Edges between the same two hosts share that wire, so its rate is the sum of theirs. A pair
    with an unlimited edge is left out: the network then shapes nothing between them.
    """
    rates: dict[frozenset[str], float] = {}
    unlimited: set[frozenset[str]] = set()
    for edge in topology.edges:
        pair = frozenset({topology.nodes[edge.src].host, topology.nodes[edge.dst].host})
        if len(pair) == 1:
            continue
        bandwidth = topology.links[edge.name].bandwidth_mbps
        if bandwidth is None:
            unlimited.add(pair)
        else:
            rates[pair] = rates.get(pair, 0.0) + bandwidth
    return {pair: rate for pair, rate in rates.items() if pair not in unlimited}


def link_to(topology: Topology, sender: str, receiver: str, peer: Peer,
            kernel_bandwidth: bool = False) -> Peer | Link:
    """`peer` (sender -> receiver's inbox) seen through the link of the edge between the two.

    The edge's LinkSpec applies in both directions: activations forward, gradients back. With
    kernel_bandwidth the network (`--hosts netns`) already shapes the bandwidth between the two
    hosts, so only delay and jitter are left to this process.
    """
    edge = next(e for e in topology.edges if {e.src, e.dst} == {sender, receiver})
    spec = topology.links[edge.name]
    hosts = frozenset({topology.nodes[sender].host, topology.nodes[receiver].host})
    if kernel_bandwidth and hosts in host_pair_rates(topology):
        spec = replace(spec, bandwidth_mbps=None)
    return shaped(peer, spec, link_seed(topology.seed, edge.name, sender))


def shaped(peer: Peer, spec: LinkSpec, seed: int = 0, max_queued: int = 64) -> Peer | Link:
    """A Link around `peer`, or `peer` itself when the spec asks for nothing (no thread, no cost)."""
    if spec == LinkSpec():
        return peer
    return Link(peer, spec, seed, max_queued)


class Schedule:
    """When each message put on one link is released to the receiver (see the module docstring)."""

    def __init__(self, spec: LinkSpec, seed: int = 0):
        self.spec = spec
        self._random = random.Random(seed)
        self._rate = None if spec.bandwidth_mbps is None else spec.bandwidth_mbps * 1e6 / 8  # B/s
        self._on_wire = 0.0  # when the previous message finished serialising
        self._last = 0.0  # the previous message's release time

    def release(self, now: float, size: int) -> float:
        """The release time of a message of `size` bytes put on the link at `now` (seconds)."""
        on_wire = now
        if self._rate is not None:
            self._on_wire = on_wire = max(now, self._on_wire) + size / self._rate
        delay_ms = self.spec.delay_ms
        if self.spec.jitter_ms:
            delay_ms += self._random.uniform(-self.spec.jitter_ms, self.spec.jitter_ms)
        self._last = max(on_wire + max(0.0, delay_ms) / 1000, self._last)
        return self._last


@dataclass
class _Queued:
    """A message on the emulated wire; `end_by` is set for End, which the caller waits on."""

    message: wire.Message
    release: float
    end_by: float | None = None
    acked: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class Link:
    """A Peer behind an emulated link. Use from one thread, like the Peer it replaces."""

    def __init__(self, peer: Peer, spec: LinkSpec, seed: int = 0, max_queued: int = 64):
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        self.spec = spec
        self.max_queued = max_queued
        self._block_timeout_ms = peer.config.block_timeout_ms
        # The thread waits in short slices so that close is never stuck behind a full receiver.
        peer.config = replace(peer.config, block_timeout_ms=SEND_SLICE_MS)
        self._peer = peer
        self.name, self.address = peer.name, peer.address
        self._schedule = Schedule(spec, seed)
        self._queue: collections.deque[_Queued] = collections.deque()
        self._changed = threading.Condition()
        self._close_by: float | None = None  # set by close: deliver until then, then stop
        self._error: BaseException | None = None
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"link-{peer.name}->{peer.address}",
                                        daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Messages that never reached the receiver: dropped by the Peer's "drop" policy when
        their time came, or still on the emulated wire when the link was closed."""
        return self._dropped

    def send(self, msg: wire.Message) -> bool:
        """Put `msg` on the link; True (a later drop by the "drop" policy is counted in `dropped`).

        Blocks while max_queued messages are on the link; raises PeerTimeout after the Peer's
        block_timeout_ms of that, and re-raises an error the link thread met.
        """
        timeout = self._block_timeout_ms
        self._put(msg, None if timeout is None else time.monotonic() + timeout / 1000)
        return True

    def end(self, edge: str, seq: int, timeout_ms: int = 10_000) -> bool:
        """Send End(edge, seq) behind every queued message and wait for its EndAck, as Peer.end."""
        deadline = time.monotonic() + timeout_ms / 1000
        try:
            item = self._put(wire.End(edge, seq), deadline, end_by=deadline)
        except PeerTimeout:
            return False
        # The thread gives up at the deadline too; the slice covers its last poll.
        item.done.wait(max(0.0, deadline - time.monotonic()) + 2 * SEND_SLICE_MS / 1000)
        return item.acked

    def close(self) -> None:
        """Deliver what is due within the Peer's linger_ms, drop the rest, close the Peer."""
        linger_s = self._peer.config.linger_ms / 1000
        with self._changed:
            if self._close_by is None:
                self._close_by = time.monotonic() + linger_s
            self._changed.notify_all()
        # The thread ends by close_by, then spends at most linger_ms closing the Peer.
        self._thread.join(2 * linger_s + 2 * SEND_SLICE_MS / 1000)
        if self._thread.is_alive():
            log.warning("link %s -> %s: sending thread did not stop", self.name, self.address)

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _put(self, msg: wire.Message, deadline: float | None, end_by: float | None = None) -> _Queued:
        size = message_bytes(msg)
        with self._changed:
            while len(self._queue) >= self.max_queued and self._open():
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise PeerTimeout(f"link {self.name!r} -> {self.address}: {self.max_queued} "
                                      f"messages queued, no room for {msg.KIND!r} before the timeout")
                self._changed.wait(wait)
            if self._error is not None:
                raise self._error
            if self._close_by is not None:
                raise RuntimeError(f"link {self.name!r} -> {self.address} is closed")
            item = _Queued(msg, self._schedule.release(time.monotonic(), size), end_by)
            self._queue.append(item)
            self._changed.notify_all()
            return item

    def _open(self) -> bool:
        return self._error is None and self._close_by is None

    def _run(self) -> None:
        """The link thread: hand each message to the Peer at its release time."""
        try:
            while (item := self._next()) is not None:
                self._deliver(item)
        except BaseException as error:  # surfaces in the caller's next send or end
            log.warning("link %s -> %s failed: %s", self.name, self.address, error)
            with self._changed:
                self._error = error
        finally:
            with self._changed:
                self._dropped += len(self._queue)
                for item in self._queue:
                    item.done.set()
                self._queue.clear()
                self._changed.notify_all()
            self._peer.close()

    def _next(self) -> _Queued | None:
        """The next message once its release time has come; None when closing is over."""
        with self._changed:
            while True:
                now = time.monotonic()
                close_by = self._close_by
                if close_by is not None and (not self._queue or now >= close_by):
                    return None
                if self._queue and now >= self._queue[0].release:
                    item = self._queue.popleft()
                    self._changed.notify_all()  # room for a blocked send
                    return item
                wake = self._queue[0].release if self._queue else None
                if close_by is not None:
                    wake = close_by if wake is None else min(wake, close_by)
                self._changed.wait(None if wake is None else wake - now)

    def _deliver(self, item: _Queued) -> None:
        if item.end_by is not None:
            end = item.message
            left_ms = int((item.end_by - time.monotonic()) * 1000)
            item.acked = left_ms > 0 and self._peer.end(end.edge, end.seq, timeout_ms=left_ms)
            item.done.set()
            return
        timeout = self._block_timeout_ms
        give_up = None if timeout is None else time.monotonic() + timeout / 1000
        while True:
            try:
                if not self._peer.send(item.message):
                    self._dropped += 1
                return
            except PeerTimeout:
                now = time.monotonic()
                if self._close_by is not None and now >= self._close_by:
                    self._dropped += 1
                    return
                if give_up is not None and now >= give_up:
                    raise
