"""CURVE (issue 14) on real sockets over 127.0.0.1: the key folder, and who can deliver what.

An outsider here is a raw pyzmq DEALER, as anyone would write one: with no key, with a key of
another mesh, with a mesh key the inbox does not admit, or with a mesh member's key claiming
another member's routing id. Each sends the forged messages that once stopped, ended or fed a
node (tests/test_hostile.py), under a real neighbour's name, and connects before that neighbour.
None of it may reach the application, and each is counted. No sleep stands in for
synchronisation: the tests wait on socket monitor events and on the inbox's counters (reading
the inbox meanwhile, which must give nothing), always with a timeout.
"""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from dni_mesh import cli, wire
from dni_mesh.node import node_curve
from dni_mesh.security import LAUNCHER, SECRET_SUFFIX, SecurityError, create_keys, curve_for
from dni_mesh.topology import load_topology
from dni_mesh.transport import CURVE_OVERHEAD, Inbox, Peer, TransportConfig, TransportError

WAIT_MS = 20_000
MESH = ("source", "l1", "l2", "head", LAUNCHER)
X = torch.arange(12, dtype=torch.float32).reshape(3, 4)
LABELS = torch.tensor([1, 2, 3])


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mesh") / "keys"
    create_keys(folder, MESH)
    return folder


@pytest.fixture(scope="module")
def other_mesh(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("other") / "keys"
    create_keys(folder, MESH)
    return folder


@pytest.fixture
def contexts() -> Iterator[Callable[[], zmq.Context]]:
    """One context per process being played: a context holds one ZAP handler."""
    made: list[zmq.Context] = []

    def make() -> zmq.Context:
        made.append(zmq.Context())
        return made[-1]
    yield make
    for context in made:
        context.destroy(linger=0)


def config(keys: Path, name: str, clients: tuple[str, ...] = ()) -> TransportConfig:
    return TransportConfig(linger_ms=0, curve=curve_for(keys, name, clients))


def forged(node: str) -> list[list[bytes]]:
    """What an impostor of l1 sends to l2: any of it taken would stop, end or feed l2."""
    messages = [wire.Stop(node, "forged stop"), wire.Stop(LAUNCHER, "forged stop"),
                wire.End("l1->l2", 0), wire.Activation("l1->l2", 0, torch.zeros(3, 4), LABELS)]
    return [[bytes(f) for f in wire.encode(m)] for m in messages]


class Outsider:
    """A raw DEALER under a routing id of its choosing, with the CURVE keys it was given."""

    def __init__(self, context: zmq.Context, address: str, routing_id: bytes,
                 keys: Path | None = None, name: str = "", server: bytes | None = None):
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTING_ID, routing_id)
        if keys is not None:
            curve = curve_for(keys, name, ())
            self.socket.setsockopt(zmq.CURVE_SERVERKEY, server)
            self.socket.setsockopt(zmq.CURVE_PUBLICKEY, curve.public_key)
            self.socket.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key)
        self.monitor = self.socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.socket.connect(address)

    def handshake(self) -> int:
        """The first handshake event of this connection: it succeeded or was refused."""
        assert self.monitor.poll(WAIT_MS), "no handshake within the timeout"
        return recv_monitor_message(self.monitor)["event"]

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=0)


def read_nothing_until(inbox: Inbox, done: Callable[[], bool], what: str) -> None:
    """Read the inbox until `done`: nothing may come out of it meanwhile."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        got = inbox.recv(20)
        assert got is None, f"{got.peer} delivered {got.message.KIND}"


def exchange(inbox: Inbox, peer: Peer, sender: str) -> None:
    """A real act and End from `peer`, the End acknowledged back on its connection."""
    peer.send(wire.Activation("l1->l2", 0, X, LABELS))
    got = inbox.recv(WAIT_MS)
    assert got is not None and got.peer == sender
    assert torch.equal(got.message.h, X) and torch.equal(got.message.labels, LABELS)
    peer.send(wire.End("l1->l2", 1))
    end = inbox.recv(WAIT_MS)
    assert end is not None and (end.peer, end.message) == (sender, wire.End("l1->l2", 1))
    assert inbox.send(sender, wire.EndAck("l1->l2", 1))
    assert peer.recv(WAIT_MS) == wire.EndAck("l1->l2", 1)


# The key folder.

def test_keys_are_private_and_never_overwritten(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    assert create_keys(folder, ["a", "b"]) == ["a", "b"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {"a.key": 0o644, "a.key_secret": 0o600, "b.key": 0o644, "b.key_secret": 0o600}
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SecurityError, match="would overwrite b.key, b.key_secret"):
        create_keys(folder, ["c", "b"])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # not even c was written
    with pytest.raises(SecurityError, match="cannot name a key file"):
        create_keys(folder, ["../evil"])


def test_the_keys_command_writes_every_node_and_the_launcher_and_prints_no_secret(tmp_path, capsys) -> None:
    folder = tmp_path / "keys"
    assert cli.main(["keys", str(folder), "--nodes", "a,b"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == [
        "a.key", "a.key_secret", "b.key", "b.key_secret", "launcher.key", "launcher.key_secret"]
    for name in ("a", "b", LAUNCHER):
        secret = curve_for(folder, name, ()).secret_key.decode()
        assert secret not in out
    assert cli.main(["keys", str(folder), "--nodes", "c"]) == 2  # launcher.key exists
    assert "would overwrite" in capsys.readouterr().err
    assert cli.main(["keys", str(tmp_path / "other"), "--nodes", f"a,{LAUNCHER}"]) == 2


def test_settings_never_show_the_secret_key(keys: Path) -> None:
    curve = curve_for(keys, "l2", ("l1", "head"))
    secret = curve.secret_key.decode()
    assert zmq.curve_public(curve.secret_key) == curve.public_key
    assert curve.clients == {"l1", "head"} and curve.server_key("head") == curve_for(keys, "head", ()).public_key
    for text in (repr(curve), str(curve), repr(TransportConfig(curve=curve))):
        assert secret not in text


def test_keys_that_are_missing_exposed_or_mismatched_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    create_keys(folder, ["a", "b", "c"])
    with pytest.raises(SecurityError, match="no public key for ghost"):
        curve_for(folder, "a", ["b", "ghost"])
    with pytest.raises(SecurityError, match="z.key_secret is missing"):
        curve_for(folder, "z", ["a"])
    with pytest.raises(SecurityError, match="no public key for 'ghost'"):
        curve_for(folder, "a", ["b"]).server_key("ghost")
    (folder / f"b{SECRET_SUFFIX}").chmod(0o644)
    with pytest.raises(SecurityError, match=r"can be read by other users \(mode 0644\): chmod 600"):
        curve_for(folder, "b", ["a"])
    (folder / "c.key").write_bytes((folder / "a.key").read_bytes())  # c's public key replaced
    with pytest.raises(SecurityError, match="c.key is not the public key of c.key_secret"):
        curve_for(folder, "c", ["a"])
    with pytest.raises(SecurityError, match="share a public key"):
        curve_for(folder, "a", ["a", "c"])
    with pytest.raises(SecurityError, match="no key folder"):
        curve_for(tmp_path / "nowhere", "a", [])


# Who can deliver what.

def test_members_exchange_messages_and_replies(keys: Path, contexts) -> None:
    """l1 -> l2 and the EndAck back, under CURVE; a frame of exactly max_msg_bytes still passes
    (libzmq checks MAXMSGSIZE against the encrypted frame, CURVE_OVERHEAD bytes longer)."""
    largest = 1 << 20
    with Inbox("tcp://127.0.0.1:0", "l2", TransportConfig(linger_ms=0, max_msg_bytes=largest,
                                                          curve=curve_for(keys, "l2", ("l1",))),
               contexts()) as inbox, \
            Peer(inbox.address, "l1", config(keys, "l1"), contexts(), server="l2") as peer:
        exchange(inbox, peer, "l1")
        peer.send(wire.Activation("l1->l2", 1, torch.ones(largest // 4), LABELS))
        got = inbox.recv(WAIT_MS)
        assert got is not None and got.message.h.numel() == largest // 4
        assert (inbox.refused, inbox.refused_connections, inbox.bad_messages) == (0, 0, 0)
    assert CURVE_OVERHEAD == 33


@pytest.mark.parametrize("outsider", ["no key", "another mesh's key", "a key not admitted here",
                                      "the wrong server key"])
def test_an_outsider_delivers_nothing_and_is_counted(keys, other_mesh, contexts, outsider) -> None:
    """It takes l1's name before l1 connects (without CURVE it would then speak for l1 for
    good: tests/test_hostile.py) and sends a forged Stop, End and act: none arrives, the refused
    handshake is counted, and the real l1 is heard."""
    with Inbox("tcp://127.0.0.1:0", "l2", config(keys, "l2", ("l1", "head")), contexts()) as inbox:
        l2_key = curve_for(keys, "l2", ()).public_key
        key_folder, name, server = {
            "no key": (None, "", None),
            "another mesh's key": (other_mesh, "l1", l2_key),
            "a key not admitted here": (keys, "source", l2_key),
            "the wrong server key": (keys, "l1", curve_for(keys, "head", ()).public_key),
        }[outsider]
        impostor = Outsider(contexts(), inbox.address, b"l1", key_folder, name, server)
        try:
            for frames in forged("l2"):
                try:
                    impostor.socket.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:  # the refused pipe is already gone: nothing can be queued
                    pass
            assert impostor.handshake() != zmq.EVENT_HANDSHAKE_SUCCEEDED
            read_nothing_until(inbox, lambda: inbox.refused_connections >= 1, "the refused handshake")
            with Peer(inbox.address, "l1", config(keys, "l1"), contexts(), server="l2") as l1:
                exchange(inbox, l1, "l1")
            assert inbox.refused == 0 and inbox.bad_messages == 0
            assert impostor.socket.poll(0) == 0  # nothing was sent back to it either
        finally:
            impostor.close()


def test_a_member_cannot_speak_as_another_member_nor_lock_it_out(keys, contexts) -> None:
    """head's key under l1's routing id, connected before l1: its forged messages are refused
    and counted under head's name, and l1 (which claims no routing id) is still heard; replies
    go to l1's connection."""
    with Inbox("tcp://127.0.0.1:0", "l2", config(keys, "l2", ("l1", "head")), contexts()) as inbox:
        l2_key = curve_for(keys, "l2", ()).public_key
        impostor = Outsider(contexts(), inbox.address, b"l1", keys, "head", l2_key)
        try:
            assert impostor.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
            sent = forged("l2")
            for frames in sent:
                impostor.socket.send_multipart(frames, zmq.NOBLOCK)
            read_nothing_until(inbox, lambda: inbox.refused == len(sent), "the refused messages")
            assert inbox.refused_by_peer == {"head": len(sent)}
            with Peer(inbox.address, "l1", config(keys, "l1"), contexts(), server="l2") as l1:
                exchange(inbox, l1, "l1")
            assert inbox.refused_connections == 0
            assert impostor.socket.poll(0) == 0
        finally:
            impostor.close()


def test_a_reconnecting_member_is_heard_at_once(keys, contexts) -> None:
    """Without CURVE a second connection under a connected name is ignored (no handover); under
    CURVE a node that restarts is heard on its new connection at once, and replies follow it."""
    with Inbox("tcp://127.0.0.1:0", "l2", config(keys, "l2", ("l1",)), contexts()) as inbox, \
            Peer(inbox.address, "l1", config(keys, "l1"), contexts(), server="l2") as old:
        exchange(inbox, old, "l1")
        with Peer(inbox.address, "l1", config(keys, "l1"), contexts(), server="l2") as new:
            exchange(inbox, new, "l1")


def test_a_peer_reaches_only_the_inbox_whose_key_it_expects(keys, contexts) -> None:
    """A node's control peer dials the launcher; whoever listens there without the launcher's
    secret key (here l2's inbox, which admits the node) completes no handshake and gets nothing."""
    with Inbox("tcp://127.0.0.1:0", "l2", config(keys, "l2", ("l1",)), contexts()) as fake, \
            Peer(fake.address, "l1", config(keys, "l1"), contexts(), server=LAUNCHER) as control:
        control.send(wire.Hello("l1", 1, "host", "tcp://127.0.0.1:1"))
        read_nothing_until(fake, lambda: fake.refused_connections >= 1, "the refused handshake")


def test_one_curve_inbox_per_context_and_peers_name_their_server(keys, contexts) -> None:
    context = contexts()
    with Inbox("tcp://127.0.0.1:0", "l2", config(keys, "l2", ("l1",)), context) as inbox:
        with pytest.raises(TransportError, match="one CURVE inbox per zmq.Context"):
            Inbox("tcp://127.0.0.1:0", "l2", config(keys, "l2", ("l1",)), context)
        with pytest.raises(ValueError, match="name the server"):
            Peer(inbox.address, "l1", config(keys, "l1"), context)
        with pytest.raises(SecurityError, match="no public key for 'ghost'"):
            Peer(inbox.address, "l1", config(keys, "l1"), context, server="ghost")
        with pytest.raises(ValueError, match="cannot use the CURVE keys of 'l1'"):
            Peer(inbox.address, "head", config(keys, "l1"), context, server="l2")
        with Peer(inbox.address, "l1", config(keys, "l1"), context, server="l2") as peer:
            exchange(inbox, peer, "l1")  # the inbox still works


def test_close_ends_the_zap_handler(keys, contexts) -> None:
    context = contexts()
    inbox = Inbox("tcp://127.0.0.1:0", "l2", config(keys, "l2", ("l1",)), context)
    assert any(t.name == "gatekeeper-l2" for t in threading.enumerate())
    inbox.close()
    assert not any(t.name == "gatekeeper-l2" for t in threading.enumerate())
    with Inbox("tcp://127.0.0.1:0", "l2", config(keys, "l2", ("l1",)), context):
        pass  # the context's ZAP endpoint is free again


def test_a_node_loads_its_neighbours_keys_and_the_launchers(tmp_path: Path) -> None:
    """What `run_node(curve_keys=...)` loads before it opens a socket: l2's inbox admits l1 and
    l3; with a launcher, its public key must be there too."""
    topology = load_topology(Path(__file__).resolve().parents[1] / "examples" / "mnist_dni.yaml")
    folder = tmp_path / "keys"
    create_keys(folder, topology.nodes)
    assert node_curve(None, topology, "l2", "tcp://127.0.0.1:1") is None
    curve = node_curve(folder, topology, "l2", None)
    assert curve.name == "l2" and curve.clients == topology.neighbours("l2") == {"l1", "l3"}
    with pytest.raises(SecurityError, match="no public key for 'launcher'"):
        node_curve(folder, topology, "l2", "tcp://127.0.0.1:1")
