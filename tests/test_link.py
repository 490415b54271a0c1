"""User-space link emulation over real tcp loopback sockets: delay, order, bandwidth, end, close.

A receiving thread stamps every message as it comes out of the inbox, so latencies are measured
send -> receive on one monotonic clock. Timing assertions are one-sided where a loaded machine can
only make things later (a message is never early); the bandwidth check allows 10%.
"""

import statistics
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch
import yaml

from dni_mesh import wire
from dni_mesh.link import Link, Schedule, host_pair_rates, link_to, message_bytes, shaped
from dni_mesh.topology import LinkSpec, load_topology
from dni_mesh.transport import Inbox, Peer, PeerTimeout, TransportConfig, free_tcp_port


@dataclass
class Receiver:
    """An inbox drained by its own thread, which stamps each message with its arrival time."""
    inbox: Inbox
    got: list[tuple[float, wire.Message]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            envelope = self.inbox.recv(50)
            if envelope is not None:
                self.got.append((time.monotonic(), envelope.message))
                if isinstance(envelope.message, wire.End):  # acknowledged as a node core does
                    end = envelope.message
                    self.inbox.send(envelope.peer, wire.EndAck(end.edge, end.seq))

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.got) < count:
            assert time.monotonic() < deadline, f"got {len(self.got)} of {count} messages"
            time.sleep(0.01)  # polling a counter the receiving thread fills


@pytest.fixture
def receiver():
    inbox = Inbox("tcp://127.0.0.1:0", "receiver")
    rx = Receiver(inbox)
    thread = threading.Thread(target=rx.run, daemon=True)
    thread.start()
    yield rx
    rx.stop.set()
    thread.join(5)
    inbox.close()


def peer_to(address: str, **config) -> Peer:
    return Peer(address, "sender", TransportConfig(**config))


def heartbeats(link, count: int) -> None:
    """Send `count` heartbeats, each carrying its send time, so the receiver knows the latency."""
    for step in range(count):
        link.send(wire.Heartbeat("sender", step, time.monotonic()))


def latencies_ms(rx: Receiver) -> list[float]:
    return [(at - msg.time) * 1000 for at, msg in rx.got]


@pytest.mark.timeout(30)
def test_delay_is_a_lower_bound_and_order_is_kept(receiver):
    with Link(peer_to(receiver.inbox.address), LinkSpec(delay_ms=20)) as link:
        heartbeats(link, 50)
        receiver.wait_for(50, 10)
    late = latencies_ms(receiver)
    assert [msg.step for _, msg in receiver.got] == list(range(50))
    assert min(late) >= 20.0
    print(f"delay 20 ms: latency min {min(late):.2f} median {statistics.median(late):.2f} "
          f"max {max(late):.2f} ms")


@pytest.mark.timeout(30)
def test_jitter_varies_the_delay_but_never_reorders(receiver):
    with Link(peer_to(receiver.inbox.address), LinkSpec(delay_ms=10, jitter_ms=8), seed=7) as link:
        for step in range(50):
            link.send(wire.Heartbeat("sender", step, time.monotonic()))
            time.sleep(0.002)  # spaced sends: jitter larger than the gap would reorder them
        receiver.wait_for(50, 10)
    late = latencies_ms(receiver)
    assert [msg.step for _, msg in receiver.got] == list(range(50))
    assert min(late) >= 2.0 and max(late) - min(late) > 4.0
    print(f"delay 10 ms jitter 8 ms: latency min {min(late):.2f} median "
          f"{statistics.median(late):.2f} max {max(late):.2f} ms")


def test_schedule_keeps_order_is_seeded_and_serialises_at_the_rate():
    def releases(seed: int) -> list[float]:
        schedule = Schedule(LinkSpec(delay_ms=5, jitter_ms=5), seed)
        return [schedule.release(i * 0.001, 100) for i in range(200)]

    assert releases(1) == releases(1) != releases(2)
    assert releases(1) == sorted(releases(1))
    schedule = Schedule(LinkSpec(bandwidth_mbps=8))  # 1 MB/s
    assert [schedule.release(0.0, 250_000) for _ in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert schedule.release(5.0, 1000) == pytest.approx(5.001)  # an idle link starts afresh


@pytest.mark.timeout(30)
def test_bandwidth_is_a_ceiling_the_link_holds(receiver):
    h = torch.zeros(50_000, dtype=torch.uint8)
    messages = [wire.Activation("a->b", seq, h) for seq in range(30)]  # 1.5 MB
    with Link(peer_to(receiver.inbox.address), LinkSpec(bandwidth_mbps=8)) as link:  # 1 MB/s
        started = time.monotonic()
        for message in messages:
            link.send(message)
        receiver.wait_for(30, 10)
    seconds = receiver.got[-1][0] - started
    rate = sum(map(message_bytes, messages)) / seconds
    # Pacing can only be late under load, never early: the ceiling is exact, the floor loose.
    assert 0.25e6 < rate <= 1e6 * 1.01
    print(f"bandwidth 8 Mbit/s: measured {rate * 8 / 1e6:.3f} Mbit/s over {seconds:.2f} s")


def test_zero_spec_is_the_plain_peer():
    peer = peer_to(f"tcp://127.0.0.1:{free_tcp_port()}")
    try:
        assert shaped(peer, LinkSpec()) is peer
    finally:
        peer.close()


@pytest.mark.timeout(30)
def test_end_leaves_after_everything_queued_before_it(receiver):
    with Link(peer_to(receiver.inbox.address), LinkSpec(delay_ms=30)) as link:
        heartbeats(link, 20)
        assert link.end("a->b", 20, timeout_ms=5000)
    kinds = [type(msg).__name__ for _, msg in receiver.got]
    assert kinds == ["Heartbeat"] * 20 + ["End"]


@pytest.mark.timeout(30)
def test_send_blocks_while_the_queue_is_full(receiver):
    with Link(peer_to(receiver.inbox.address), LinkSpec(delay_ms=200), max_queued=2) as link:
        started = time.monotonic()
        heartbeats(link, 3)  # the third waits until the first has left
        assert time.monotonic() - started >= 0.2
        receiver.wait_for(3, 5)


@pytest.mark.timeout(30)
def test_close_with_a_dead_peer_returns_promptly():
    peer = peer_to(f"tcp://127.0.0.1:{free_tcp_port()}", linger_ms=300)  # nobody listens
    link = Link(peer, LinkSpec(delay_ms=10))
    heartbeats(link, 20)  # 8 fit the socket's queue (sndhwm), 12 stay on the link
    started = time.monotonic()
    link.close()
    assert time.monotonic() - started < 1.5
    assert link.dropped == 12


@pytest.mark.timeout(30)
def test_a_failed_link_raises_in_the_next_send():
    peer = peer_to(f"tcp://127.0.0.1:{free_tcp_port()}", linger_ms=0, block_timeout_ms=300)
    with Link(peer, LinkSpec(delay_ms=1)) as link:
        heartbeats(link, 9)  # the ninth finds the socket's queue full
        assert not link.end("a->b", 9, timeout_ms=5000)  # returns once the thread has given up
        with pytest.raises(PeerTimeout):
            heartbeats(link, 1)


def test_link_to_uses_the_edge_spec_both_ways(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"source": "nodes.data:Blobs"},
        "nodes": {"src": {"role": "source", "host": "a"},
                  "mid": {"module": "nodes.mlp:Block", "host": "b"},
                  "head": {"role": "head", "module": "nodes.mlp:Classifier", "host": "b"}},
        "edges": ["src -> mid", "mid -> head"],
        "hosts": {"a": {"address": "10.9.0.1"}, "b": {"address": "10.9.0.2"}},
        "links": {"src -> mid": {"delay_ms": 5, "bandwidth_mbps": 100},
                  "mid -> head": {"jitter_ms": 1}},
    }))
    topology = load_topology(path, check_imports=False)
    assert host_pair_rates(topology) == {frozenset({"a", "b"}): 100}
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    made = [link_to(topology, "src", "mid", peer_to(address)),
            link_to(topology, "mid", "src", peer_to(address)),
            link_to(topology, "mid", "src", peer_to(address), kernel_bandwidth=True),
            link_to(topology, "head", "mid", peer_to(address), kernel_bandwidth=True)]
    try:
        assert [link.spec for link in made] == [
            LinkSpec(5, 0, 100), LinkSpec(5, 0, 100), LinkSpec(5, 0, None), LinkSpec(0, 1, None)]
    finally:
        for link in made:
            link.close()
