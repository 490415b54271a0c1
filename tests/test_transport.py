"""Transport tests on real sockets: loopback tcp and ipc, real processes.

No sleep stands in for synchronisation (one test pauses on purpose: the pause is what it tests),
and every wait has a timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import socket
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from dni_mesh import wire
from dni_mesh.transport import (Envelope, Inbox, Peer, PeerTimeout, TransportConfig, TransportError,
                                 free_port_range, free_tcp_port)

WAIT_MS = 20_000  # generous: the machine running the suite may be loaded
MEGABYTE = torch.zeros(1 << 18)  # 1 MiB of float32: enough to fill hwm queues and kernel buffers
INVALID_VECTORS = sorted((Path(__file__).resolve().parents[1] / "protocols" / "vectors" / "invalid").glob("*.json"))


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _act(seq: int) -> wire.Activation:
    return wire.Activation("a->b", seq, torch.full((4,), float(seq)), torch.tensor([seq % 10]))


def _sender(conn: Connection, count: int) -> None:
    """Child process: send `count` activations to the address it is given, then end the stream."""
    if not conn.poll(WAIT_MS / 1000):
        raise SystemExit("no address from the test")
    with Peer(conn.recv(), "sender") as peer:
        for seq in range(count):
            peer.send(_act(seq))
        if not peer.end("a->b", count, timeout_ms=WAIT_MS):
            raise SystemExit("end of stream was not acknowledged")


@pytest.mark.parametrize("scheme,count", [("tcp", 10_000), ("ipc", 1_000)])
def test_stream_between_processes_arrives_complete_in_order(tmp_path, scheme: str, count: int) -> None:
    address = "tcp://127.0.0.1:0" if scheme == "tcp" else f"ipc://{tmp_path}/inbox"
    spawn = multiprocessing.get_context("spawn")
    ours, theirs = spawn.Pipe()
    child = spawn.Process(target=_sender, args=(theirs, count))
    child.start()
    try:
        with Inbox(address, "receiver") as inbox:
            ours.send(inbox.address)
            for seq in range(count):
                got = inbox.recv(timeout_ms=WAIT_MS)
                assert got is not None, f"message {seq} did not arrive"
                assert got.peer == "sender"
                assert isinstance(got.message, wire.Activation) and got.message.seq == seq
                assert got.message.h[0].item() == seq and got.message.labels.item() == seq % 10
            end = inbox.recv(timeout_ms=WAIT_MS)
            assert end is not None and end.message == wire.End("a->b", count)
            assert inbox.send(end.peer, wire.EndAck("a->b", count))  # the child waits for it
            child.join(WAIT_MS / 1000)
            assert child.exitcode == 0
            assert inbox.bad_messages == 0
    finally:
        child.kill()


def test_bad_frames_from_one_peer_do_not_disturb_another(context: zmq.Context) -> None:
    with Inbox("tcp://127.0.0.1:0", "receiver", context=context) as inbox, \
            Peer(inbox.address, "good", context=context) as good:
        junk = context.socket(zmq.DEALER)
        junk.setsockopt(zmq.ROUTING_ID, b"junk")
        junk.setsockopt(zmq.LINGER, 0)
        junk.connect(inbox.address)
        header, buffer = wire.encode(wire.Activation("junk", 0, torch.ones(4)))
        huge = msgpack.unpackb(header)
        huge["tensors"][0].update(shape=[1 << 20, 1 << 20], nbytes=(1 << 40) * 4)
        bad_frames = [
            [b"\xc1 is never valid msgpack"],
            [b""],
            [msgpack.packb([1, 2, 3])],
            [msgpack.packb({"v": 99, "kind": "act"})],
            [header],  # a tensor frame missing
            [header, buffer, b"extra"],
            [header, bytes(buffer)[:-1]],  # short tensor frame
            [msgpack.packb(huge), buffer],  # claims a 4 TiB tensor
            [header] + [buffer] * 100,
            # every golden invalid vector, among them the 1001-byte frame of an array nested 1000
            # deep (it killed nodes with a RecursionError) and maps that repeat a key
            *([bytes.fromhex(f) for f in json.loads(path.read_text(encoding="utf-8"))["frames"]]
              for path in INVALID_VECTORS),
        ]
        for i, frames in enumerate(bad_frames):
            junk.send_multipart(frames)
            good.send(_act(i))
        junk.send_multipart(wire.encode(wire.End("junk", 0)))  # a good message after the junk
        received = []
        while len(received) < len(bad_frames) + 1:
            got = inbox.recv(timeout_ms=WAIT_MS)
            assert got is not None
            received.append((got.peer, got.message.seq))
        assert [seq for peer, seq in received if peer == "good"] == list(range(len(bad_frames)))
        assert ("junk", 0) in received
        assert inbox.bad_by_peer == {"junk": len(bad_frames)}
        assert inbox.bad_messages == len(bad_frames)
        junk.close()


def _small_queues(**changes: object) -> TransportConfig:
    return TransportConfig(sndhwm=1, rcvhwm=1, linger_ms=0, **changes)


def _fill(peer: Peer, message: wire.Message) -> int:
    """Send `message` until the receiver has no room; return how many sends were accepted."""
    for accepted in range(500):
        if not peer.send(message):
            return accepted
    raise AssertionError("the receiver never filled up")


def test_drop_policy_counts_drops_while_the_receiver_does_not_read(context: zmq.Context) -> None:
    config = _small_queues()
    with Inbox("tcp://127.0.0.1:0", "receiver", config, context) as inbox, \
            Peer(inbox.address, "sender", config, context) as peer:
        accepted = _fill(peer, wire.Gradient("a->b", 0, MEGABYTE))
        assert peer.dropped_by_kind == {"grad": 1} and peer.dropped == 1
        for _ in range(accepted):  # what was accepted still arrives whole
            got = inbox.recv(timeout_ms=WAIT_MS)
            assert got is not None and torch.equal(got.message.dh, MEGABYTE)


def test_block_policy_raises_peer_timeout_after_its_timeout(context: zmq.Context) -> None:
    config = _small_queues(block_timeout_ms=300)
    with Inbox("tcp://127.0.0.1:0", "receiver", config, context) as inbox, \
            Peer(inbox.address, "sender", config, context) as peer:
        message = wire.Activation("a->b", 0, MEGABYTE)
        with pytest.raises(PeerTimeout, match="no room for 'act'"):
            for _ in range(500):
                started = time.monotonic()
                peer.send(message)
        assert 0.29 <= time.monotonic() - started < 10
        assert peer.dropped == 0
        assert inbox.recv(timeout_ms=WAIT_MS) is not None


def test_a_receiver_that_stops_reading_keeps_backpressure_and_loses_nothing(context: zmq.Context) -> None:
    """Regression: with ZMTP heartbeat timeouts on the inbox, libzmq cut the connection of a peer
    whose inbox was not being read (it cannot see the answers then) and the sender's queue leaked
    into new connections: sends never blocked and most messages vanished."""
    config = TransportConfig(sndhwm=2, rcvhwm=2, heartbeat_ivl_ms=50, heartbeat_timeout_ms=200,
                             block_timeout_ms=300)
    with Inbox("tcp://127.0.0.1:0", "receiver", config, context) as inbox, \
            Peer(inbox.address, "sender", config, context) as peer:
        payload = torch.zeros(1 << 14)
        peer.send(wire.Activation("a->b", 0, payload))
        assert inbox.recv(timeout_ms=WAIT_MS) is not None  # connected
        accepted = 0
        with pytest.raises(PeerTimeout):
            while accepted < 5_000:
                peer.send(wire.Activation("a->b", accepted, payload))
                accepted += 1
        time.sleep(0.5)  # the condition under test: many heartbeat timeouts without reading
        for seq in range(accepted):
            got = inbox.recv(timeout_ms=WAIT_MS)
            assert got is not None and got.message.seq == seq


def test_end_and_close_return_in_time_when_the_peer_is_gone(context: zmq.Context) -> None:
    config = TransportConfig(linger_ms=200, block_timeout_ms=1000)
    inbox = Inbox("tcp://127.0.0.1:0", "receiver", config, context)
    peer = Peer(inbox.address, "sender", config)  # own context: close must also end it in time
    peer.send(_act(0))
    assert inbox.recv(timeout_ms=WAIT_MS) is not None
    inbox.close()
    for seq in range(1, 4):  # queued towards a dead peer
        peer.send(_act(seq))
    started = time.monotonic()
    assert peer.end("a->b", 4, timeout_ms=300) is False
    assert 0.29 <= time.monotonic() - started < 10
    started = time.monotonic()
    peer.close()
    assert time.monotonic() - started < 5


def test_end_is_acknowledged_only_by_the_application(context: zmq.Context) -> None:
    """Regression: the inbox answered every End it took out, so a forged End was acknowledged."""
    with Inbox("tcp://127.0.0.1:0", "receiver", context=context) as inbox, \
            Peer(inbox.address, "sender", context=context) as peer:
        assert peer.end("a->b", 0, timeout_ms=200) is False
        assert inbox.recv(timeout_ms=WAIT_MS) == Envelope("sender", wire.End("a->b", 0))
        assert peer.recv(timeout_ms=300) is None  # taking the End out answered nothing
        assert inbox.send("sender", wire.EndAck("a->b", 0)) is True  # the application answers
        assert peer.recv(timeout_ms=WAIT_MS) == wire.EndAck("a->b", 0)
        assert peer.recv() is None


def test_end_drops_and_counts_other_replies_while_it_waits(context: zmq.Context) -> None:
    with Inbox("tcp://127.0.0.1:0", "receiver", context=context) as inbox, \
            Peer(inbox.address, "sender", context=context) as peer:
        peer.send(_act(0))
        assert inbox.recv(timeout_ms=WAIT_MS) is not None  # connected: replies can go back
        for reply in (wire.Stop("launcher", "late"), wire.EndAck("a->b", 2), wire.EndAck("c->d", 3),
                      wire.EndAck("a->b", 3)):
            assert inbox.send("sender", reply)
        assert peer.end("a->b", 3, timeout_ms=WAIT_MS) is True
        assert (peer.unexpected, peer.bad_messages) == (3, 0)
        assert inbox.recv(timeout_ms=WAIT_MS).message == wire.End("a->b", 3)


def test_peer_recv_drops_and_counts_bad_replies(context: zmq.Context) -> None:
    router = context.socket(zmq.ROUTER)  # a hostile inbox, written from protocols/ alone
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    with Peer(f"tcp://127.0.0.1:{port}", "node", context=context) as peer:
        assert peer.recv() is None  # nothing yet: just looks
        peer.send(wire.Ready("node"))
        assert router.poll(WAIT_MS) and router.recv_multipart()[0] == b"node"
        bad = [[b"\xc1"], [b"\x91" * 1000 + b"\xc0"], wire.encode(wire.Activation("e", 0, torch.ones(2)))[:1]]
        for frames in bad:
            router.send_multipart([b"node", *frames])
        router.send_multipart([b"node", *wire.encode(wire.Stop("launcher", "done"))])
        assert peer.recv(timeout_ms=WAIT_MS) == wire.Stop("launcher", "done")
        assert peer.bad_messages == len(bad)
    router.close()


def test_inbox_send_never_blocks_and_counts_what_it_could_not_send(context: zmq.Context, caplog) -> None:
    config = _small_queues()
    with Inbox("tcp://127.0.0.1:0", "receiver", config, context) as inbox, \
            Peer(inbox.address, "sender", config, context) as peer:
        with caplog.at_level(logging.WARNING, logger="dni_mesh.transport"):
            assert inbox.send("nobody", wire.Stop("launcher", "x")) is False  # no such connection
        assert "could not send stop #1 to peer 'nobody'" in caplog.text
        peer.send(_act(0))
        assert inbox.recv(timeout_ms=WAIT_MS) is not None  # connected
        started, sent = time.monotonic(), 0
        while inbox.send("sender", wire.Activation("r->s", sent, MEGABYTE)):  # the peer does not read
            sent += 1
            assert sent < 500, "the peer's queue never filled"
        assert time.monotonic() - started < 10
        assert inbox.unsent_by_peer == {"nobody": 1, "sender": 1}
        for seq in range(sent):  # what was sent arrives whole
            got = peer.recv(timeout_ms=WAIT_MS)
            assert isinstance(got, wire.Activation) and got.seq == seq and torch.equal(got.h, MEGABYTE)


def test_a_second_connection_with_a_peers_name_cannot_take_over(context: zmq.Context) -> None:
    """Regression: with ROUTER_HANDOVER, a DEALER that connected with a node's name took over that
    node's connection, and with it the node's edge."""
    with Inbox("tcp://127.0.0.1:0", "receiver", context=context) as inbox, \
            Peer(inbox.address, "l1", context=context) as real:
        real.send(_act(0))
        got = inbox.recv(timeout_ms=WAIT_MS)
        assert got is not None and (got.peer, got.message.seq) == ("l1", 0)
        squatter = context.socket(zmq.DEALER)
        squatter.setsockopt(zmq.ROUTING_ID, b"l1")
        squatter.setsockopt(zmq.LINGER, 0)
        monitor = squatter.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        squatter.connect(inbox.address)
        assert monitor.poll(WAIT_MS) and recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
        for seq in range(3):
            squatter.send_multipart(wire.encode(wire.Activation("forged", seq, torch.ones(1))))
            real.send(_act(1 + seq))
        for seq in range(1, 4):
            got = inbox.recv(timeout_ms=WAIT_MS)
            assert got is not None and (got.peer, got.message.edge, got.message.seq) == ("l1", "a->b", seq)
        assert inbox.recv(timeout_ms=300) is None  # nothing of the squatter's, under any name
        assert inbox.send("l1", wire.Stop("launcher", "done"))  # replies still reach the real peer
        assert real.recv(timeout_ms=WAIT_MS) == wire.Stop("launcher", "done")
        assert squatter.poll(300) == 0
        real.send(_act(4))
        got = inbox.recv(timeout_ms=WAIT_MS)
        assert got is not None and (got.peer, got.message.edge, got.message.seq) == ("l1", "a->b", 4)
        squatter.disable_monitor()
        monitor.close()
        squatter.close()


def test_max_msg_size_cuts_off_an_oversize_sender_only(context: zmq.Context) -> None:
    config = TransportConfig(max_msg_bytes=64 << 10, linger_ms=0)
    with Inbox("tcp://127.0.0.1:0", "receiver", config, context) as inbox, \
            Peer(inbox.address, "big", config, context) as big, \
            Peer(inbox.address, "small", config, context) as small:
        big.send(wire.Activation("big->r", 0, MEGABYTE))
        small.send(_act(0))
        small.send(_act(1))
        for seq in (0, 1):
            got = inbox.recv(timeout_ms=WAIT_MS)
            assert got is not None and (got.peer, got.message.seq) == ("small", seq)
        assert inbox.recv(timeout_ms=200) is None


@pytest.mark.parametrize("make", [
    lambda: TransportConfig(policy={"act": "sometimes"}),
    lambda: Peer("tcp://127.0.0.1:1", ""),
])
def test_bad_arguments_are_refused(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()


def test_inbox_reports_its_bound_address_and_times_out(context: zmq.Context) -> None:
    port = free_tcp_port()
    with Inbox(f"tcp://127.0.0.1:{port}", "receiver", context=context) as inbox:
        assert inbox.address == f"tcp://127.0.0.1:{port}"
        assert inbox.recv(timeout_ms=0) is None
        with pytest.raises(TransportError, match="cannot bind"):
            Inbox(inbox.address, "twin", context=context)


def test_free_port_range_gives_bindable_ports_below_the_ephemeral_range():
    start = free_port_range(8)
    with open("/proc/sys/net/ipv4/ip_local_port_range") as limits:
        ephemeral_low = int(limits.read().split()[0])
    assert 10_000 <= start and start + 8 <= ephemeral_low
    sockets = [socket.socket() for _ in range(8)]
    try:
        for i, sock in enumerate(sockets):
            sock.bind(("127.0.0.1", start + i))  # raises if any was taken
    finally:
        for sock in sockets:
            sock.close()
