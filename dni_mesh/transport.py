"""ZeroMQ transport: one inbox per process, one peer per process it sends to.

Every process binds ONE `Inbox` (a ROUTER socket). To send to another process it connects ONE
`Peer` (a DEALER socket whose ROUTING_ID is the sender's name) to that process's inbox. ROUTER/DEALER
rather than PUSH/PULL because the inbox then learns who sent each message from the transport, not
from the message; it keeps one bounded queue per sender (one flooding peer cannot starve the rest);
and the same connection carries replies back (`Inbox.send`, `Peer.recv`): the EndAck for an End,
the launcher's Stop to a node.

Messages are `wire.encode` frames. Tensor frames go out zero-copy (pyzmq still copies frames under
64 KiB) and come in as views of the received ZeroMQ frames. A frame that `wire.decode` rejects is
logged, counted and dropped: a bad peer can never raise inside the receiving node. The transport
never answers a message on its own: whether an End is acknowledged is the application's decision.

With `TransportConfig.curve` (`dni_mesh.security.Curve`) every socket uses CURVE, ZeroMQ's
authenticated encryption: the inbox is a CURVE server whose ZAP handler (a `Gatekeeper` thread)
admits only its clients' public keys and names each connection after its key, and a peer is a
CURVE client that knows the public key of the inbox it dials. The inbox then takes the sender's
name from the key (the frame's "User-Id"), never from the routing id. Connections that fail the
handshake never reach the application; they are counted.

Share one `zmq.Context` per process: create it in `main` and pass it to every Inbox and Peer (its
one I/O thread carries about 2 GB/s on a loaded 2-core machine). Without one, each socket gets a
private context that `close` ends. A context holds one ZAP handler, so one CURVE inbox.
Sockets are not thread-safe: use each Inbox and Peer from one thread.
"""

from __future__ import annotations

import logging
import contextlib
import math
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import zmq
from zmq.utils import z85

from dni_mesh import wire
from dni_mesh.security import Curve

log = logging.getLogger(__name__)

BLOCK = "block"
DROP = "drop"
ZAP_DOMAIN = "dni-mesh"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
"""Where libzmq asks for ZAP answers (RFC 27): one handler per zmq.Context."""
CURVE_OVERHEAD = 33
"""Bytes CURVE adds to a frame on the wire (command name, nonce, MAC, flags): libzmq checks
MAXMSGSIZE against the encrypted frame."""
REFUSED_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def _default_policy() -> dict[str, str]:
    return {"act": BLOCK, "grad": DROP}


@dataclass
class TransportConfig:
    """Every socket knob in one place, each with the reason for its default."""

    sndhwm: int = 8
    """Messages queued per outgoing connection. High-water marks count messages, not bytes, so
    they must be small when a message can be a large tensor: 8 bounds memory yet keeps the pipe full."""
    rcvhwm: int = 8
    """Messages queued per sender on the inbox (a ROUTER keeps one queue per connected peer)."""
    linger_ms: int = 2000
    """How long `close` may still flush queued messages. libzmq's default is forever, which makes a
    close hang when the peer is dead."""
    max_msg_bytes: int = wire.DEFAULT_LIMITS.max_tensor_bytes
    """ZMQ MAXMSGSIZE on receiving sockets. libzmq checks it per frame before allocating and drops
    the connection of a peer that exceeds it; the default is the largest tensor `limits` allows."""
    limits: wire.Limits = wire.DEFAULT_LIMITS
    """Bounds `wire.decode` enforces on every received message."""
    heartbeat_ivl_ms: int = 1000
    """ZMTP PING interval on every socket, so that a vanished inbox (no FIN: a dead host) is noticed."""
    heartbeat_timeout_ms: int = 5000
    """A Peer drops (and redials) a connection whose inbox has sent nothing for this long; the
    inbox asks its peers for the same as HEARTBEAT_TTL. The inbox itself never times a peer out:
    while its application does not read, libzmq stops reading that connection and could not see
    the peer's answers, so it would cut a healthy sender and lose what was in flight. A frame that
    takes longer than this to arrive (a huge tensor on a slow link) also trips it. ZMTP liveness is
    answered by libzmq's I/O thread even when Python is hung: nodes need application heartbeats too."""
    handshake_ivl_ms: int = 5000
    """Give up a ZMTP handshake after this long (libzmq's 30 s lets a stuck connect linger)."""
    policy: dict[str, str] = field(default_factory=_default_policy)
    """What `Peer.send` does when the receiver is full, per message kind (`wire` KIND); kinds not
    listed block. "act" blocks: that is backpressure, a dropped activation would lose a batch.
    "grad" drops: a lost gradient only costs one synthetic-gradient regression target, and a
    downstream node that blocked on its upstream while the upstream blocked on it would deadlock.
    A locked ("backprop") mesh, which waits for every gradient, sets "grad": "block"."""
    block_timeout_ms: int | None = 60_000
    """How long "block" waits for room before raising PeerTimeout; None waits forever."""
    poll_slice_ms: int = 100
    """Longest single wait inside libzmq, so that signals (Ctrl-C) are handled while blocked."""
    curve: Curve | None = None
    """This process's CURVE keys (`dni_mesh.security.curve_for`); None: no authentication and no
    encryption, and whoever reaches a port can send (see ROUTER_HANDOVER in Inbox)."""

    def __post_init__(self) -> None:
        bad = {kind: how for kind, how in self.policy.items() if how not in (BLOCK, DROP)}
        if bad:
            raise ValueError(f"TransportConfig.policy: {bad} must be {BLOCK!r} or {DROP!r}")


class TransportError(RuntimeError):
    """A socket could not be set up or used as asked."""


class PeerTimeout(TransportError):
    """A "block" send found no room for block_timeout_ms: the receiver is slow or gone."""


@dataclass(frozen=True)
class Envelope:
    """A received message and the name (routing id) of the peer that sent it."""

    peer: str
    message: wire.Message


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, for configs that must name ports up front.

    Another process may take it before it is bound: an Inbox bound to port 0 has no such race.
    """
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def free_port_range(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive TCP ports that were free a moment ago, all below the
    kernel's ephemeral range: a topology's base_port for tests and scripts.

    Ports inside the ephemeral range are handed to outgoing connections (the mesh's own peers
    among them), so one could be taken between the check and the bind of the node that owns it.
    Another process may still bind one first: this narrows the race, it cannot close it.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as limits:
            ephemeral_low = int(limits.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default
    chooser = random.Random()
    for _ in range(100):
        start = chooser.randrange(10_000, ephemeral_low - count)
        if all(_bindable(host, port) for port in range(start, start + count)):
            return start
    raise TransportError(f"no {count} consecutive free TCP ports on {host} below {ephemeral_low}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _deadline(timeout_ms: int | None) -> float | None:
    return None if timeout_ms is None else time.monotonic() + timeout_ms / 1000


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _remaining_ms(deadline: float) -> int:
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))


def _slice_ms(deadline: float | None, slice_ms: int) -> int:
    """How long the next wait inside libzmq may be: a slice, or what is left before the deadline."""
    return slice_ms if deadline is None else min(slice_ms, _remaining_ms(deadline))


def _wait(poller: zmq.Poller, deadline: float | None, slice_ms: int) -> bool:
    """Poll until the socket is ready (True) or the deadline passes (False), in slices. It polls
    at least once, so a deadline already past means "just look"."""
    while True:
        if poller.poll(_slice_ms(deadline, slice_ms)):
            return True
        if _expired(deadline):
            return False


def _log_this_one(count: int) -> bool:
    """Whether to log the count-th event of a kind: the first 10, then every 1000th, so that a
    flooding or stuck peer cannot flood the log."""
    return count <= 10 or count % 1000 == 0


class Gatekeeper:
    """The ZAP handler of one CURVE inbox, and the count of the handshakes it refused.

    Its own thread answers ZAP requests (a client's key admitted: the connection is named after
    it; any other: refused) and drains the inbox's socket monitor of failed handshakes. The monitor
    is drained at once, not at the application's pace, because libzmq blocks its I/O thread on a
    full monitor socket: a flood of refused connections during a long step would stall every
    socket of the process. It binds the context's one ZAP endpoint.
    """

    def __init__(self, sock: zmq.Socket, inbox: str, clients: Mapping[bytes, str]):
        """Answer for `sock` (an inbox not bound yet) from now on; `clients`: admitted public
        key (Z85) -> the name a connection with it speaks as."""
        context = sock.context
        self.inbox = inbox
        self.refused_handshakes = 0
        """Connections whose handshake failed: no key, a key not admitted, a wrong server key,
        not ZMTP. A peer that keeps redialling is counted at every attempt."""
        self._names = dict(clients)
        self._refused_keys = 0
        self._watched = sock
        self._zap = context.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        try:
            self._zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError:
            self._zap.close()
            raise
        self._monitor = sock.get_monitor_socket(REFUSED_EVENTS)
        wake = f"inproc://gatekeeper-{id(self)}"
        self._wake = context.socket(zmq.PAIR)
        self._wake.bind(wake)
        woken = context.socket(zmq.PAIR)
        woken.connect(wake)
        self._thread = threading.Thread(target=self._serve, args=(woken,), daemon=True,
                                        name=f"gatekeeper-{inbox}")
        self._thread.start()

    def close(self) -> None:
        """Stop the monitor first (libzmq must not send to a monitor nobody reads), then the thread."""
        self._watched.disable_monitor()
        with contextlib.suppress(zmq.Again):  # the thread is gone already
            self._wake.send(b"", zmq.NOBLOCK)
        self._thread.join()
        self._wake.close(linger=0)

    def _serve(self, woken: zmq.Socket) -> None:
        """Until woken. Should it fail, its sockets close and, ZAP being enforced, the inbox admits
        no one from then on: it fails closed."""
        poller = zmq.Poller()
        for sock in (self._zap, self._monitor, woken):
            poller.register(sock, zmq.POLLIN)
        try:
            while woken not in (ready := dict(poller.poll())):
                if self._zap in ready:
                    self._answer(self._zap.recv_multipart())
                if self._monitor in ready:
                    self._count(self._monitor.recv_multipart())
        except Exception:
            log.exception("inbox %s: the ZAP handler failed; no connection is admitted from now on", self.inbox)
        finally:
            for sock in (self._zap, self._monitor, woken):
                sock.close(linger=0)

    def _answer(self, request: list[bytes]) -> None:
        """RFC 27: admit a client's CURVE key under its name; refuse anything else."""
        _version, request_id, _domain, address, _identity, mechanism, *credentials = request
        key = z85.encode(credentials[0]) if mechanism == b"CURVE" and len(credentials) == 1 else None
        name = self._names.get(key)
        if name is not None:
            self._zap.send_multipart([b"1.0", request_id, b"200", b"OK", name.encode(), b""])
            return
        self._refused_keys += 1
        if _log_this_one(self._refused_keys):
            log.warning("inbox %s: refused key #%d, %s from %s: not a key this inbox admits", self.inbox,
                        self._refused_keys, key.decode() if key else mechanism.decode(errors="replace"),
                        address.decode(errors="replace"))
        self._zap.send_multipart([b"1.0", request_id, b"400", b"key not admitted", b"", b""])

    def _count(self, frames: list[bytes]) -> None:
        event = int.from_bytes(frames[0][:2], "little")
        if not event & REFUSED_EVENTS:
            return
        self.refused_handshakes += 1
        if _log_this_one(self.refused_handshakes):
            log.warning("inbox %s: refused handshake #%d: %s (%#x)", self.inbox, self.refused_handshakes,
                        zmq.Event(event).name, int.from_bytes(frames[0][2:6], "little"))


class _Endpoint:
    """A socket with the config's options applied and a close that never hangs."""

    def __init__(self, kind: int, name: str, config: TransportConfig | None, context: zmq.Context | None):
        self.config = config or TransportConfig()
        if self.config.curve is not None and self.config.curve.name != name:
            raise ValueError(f"{name!r} cannot use the CURVE keys of {self.config.curve.name!r}")
        self.name = name
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        sock = self._context.socket(kind)
        for option, value in (
            (zmq.SNDHWM, self.config.sndhwm),
            (zmq.RCVHWM, self.config.rcvhwm),
            (zmq.LINGER, self.config.linger_ms),
            (zmq.MAXMSGSIZE, self.config.max_msg_bytes),
            (zmq.HEARTBEAT_IVL, self.config.heartbeat_ivl_ms),
            (zmq.HANDSHAKE_IVL, self.config.handshake_ivl_ms),
        ):
            sock.setsockopt(option, value)
        self._socket = sock

    def _fail(self, what: str, error: zmq.ZMQError) -> TransportError:
        self.close()
        return TransportError(f"{what}: {error}")

    def close(self) -> None:
        """Close within linger_ms, dropping what the peer has not taken by then."""
        if not self._socket.closed:
            self._socket.close(linger=self.config.linger_ms)
            if self._own_context:
                self._context.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Inbox(_Endpoint):
    """The one socket a process receives on (ROUTER), bound to `address`.

    "tcp://127.0.0.1:0" binds a free port; `address` then holds the real endpoint to hand out.
    With CURVE, a message's sender is the name of the key that sent it; a message whose connection
    claims another name as its routing id is refused (counted in refused_by_peer), and connections
    that fail the handshake are counted in refused_connections.
    """

    def __init__(self, address: str, name: str, config: TransportConfig | None = None,
                 context: zmq.Context | None = None):
        super().__init__(zmq.ROUTER, name, config, context)
        # Heartbeats: PING peers but never time them out ourselves (see heartbeat_timeout_ms).
        self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 0)
        self._socket.setsockopt(zmq.HEARTBEAT_TTL, self.config.heartbeat_timeout_ms)
        # Mandatory: a reply to a peer that is gone raises in `send` instead of vanishing silently.
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # No handover (libzmq's default, set to say so): while a peer's connection is up, a second
        # connection with the same routing id is ignored; with handover, anyone who can connect
        # would take over a node's edge by using its name. The price: a node restarted after its
        # host died (no TCP close reached the inbox) is ignored until TCP gives the old connection up.
        self._socket.setsockopt(zmq.ROUTER_HANDOVER, 0)
        self._gatekeeper: Gatekeeper | None = None
        if self.config.curve is not None:
            self._serve_curve(self.config.curve)
        try:
            self._socket.bind(address)
        except zmq.ZMQError as error:
            raise self._fail(f"inbox {name!r} cannot bind {address}", error) from error
        self.address: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._rcvtimeo = -1  # the socket's RCVTIMEO (libzmq's default: forever); recv sets it
        self._routes: dict[str, bytes] = {}  # CURVE: a key's name -> the routing id of its connection
        self.bad_by_peer: Counter[str] = Counter()
        self.refused_by_peer: Counter[str] = Counter()  # CURVE: by the name of the key that sent them
        self.unsent_by_peer: Counter[str] = Counter()  # replies `send` could not queue

    def _serve_curve(self, curve: Curve) -> None:
        """Be a CURVE server whose every connection ZAP must admit: ZAP_ENFORCE_DOMAIN makes a
        missing ZAP handler refuse all, where libzmq would otherwise admit any key."""
        for option, value in ((zmq.CURVE_SERVER, 1), (zmq.CURVE_PUBLICKEY, curve.public_key),
                              (zmq.CURVE_SECRETKEY, curve.secret_key), (zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode()),
                              (zmq.ZAP_ENFORCE_DOMAIN, 1),
                              (zmq.MAXMSGSIZE, self.config.max_msg_bytes + CURVE_OVERHEAD)):
            self._socket.setsockopt(option, value)
        try:
            self._gatekeeper = Gatekeeper(self._socket, self.name, curve.client_names())
        except zmq.ZMQError as error:
            raise self._fail(f"inbox {self.name!r}: no ZAP handler (one CURVE inbox per zmq.Context)",
                             error) from error

    @property
    def bad_messages(self) -> int:
        """Messages dropped because they failed to decode, from all peers."""
        return sum(self.bad_by_peer.values())

    @property
    def refused(self) -> int:
        """CURVE: messages dropped because their connection claimed a name not of its key."""
        return sum(self.refused_by_peer.values())

    @property
    def refused_connections(self) -> int:
        """CURVE: connections refused in the handshake (no key, a key not admitted here, a wrong
        server key), every redial counted; 0 without CURVE."""
        return 0 if self._gatekeeper is None else self._gatekeeper.refused_handshakes

    def close(self) -> None:
        if self._gatekeeper is not None and not self._socket.closed:
            self._gatekeeper.close()
        super().close()

    def recv(self, timeout_ms: int | None = None) -> Envelope | None:
        """The next good message, or None after timeout_ms (None: wait as long as it takes).

        Nothing is answered here, an End included: the application acknowledges an End it has
        checked with `send(envelope.peer, wire.EndAck(...))`. A stream of bad messages does not
        hold recv past its deadline.
        """
        deadline = _deadline(timeout_ms)
        while True:
            wait_ms = _slice_ms(deadline, self.config.poll_slice_ms)
            if wait_ms != self._rcvtimeo:
                self._socket.setsockopt(zmq.RCVTIMEO, wait_ms)
                self._rcvtimeo = wait_ms
            try:  # waits inside libzmq: no exception and no Python poll when a message is near
                frames = self._socket.recv_multipart(copy=False)
            except zmq.Again:
                if wait_ms == 0:
                    return None
                continue
            envelope = self._open(frames)
            if envelope is not None:
                return envelope
            if _expired(deadline):
                return None

    def _open(self, frames: list[zmq.Frame]) -> Envelope | None:
        if self.config.curve is None:
            peer = frames[0].bytes.decode("utf-8", "backslashreplace")
        elif (peer := self._authenticated(frames[0])) is None:
            return None
        try:
            message = wire.decode(frames[1:], self.config.limits)  # zmq.Frame is a writable buffer
        except wire.WireError as error:
            self.bad_by_peer[peer] += 1
            if _log_this_one(count := self.bad_by_peer[peer]):
                log.warning("inbox %s: dropped bad message #%d from peer %r: %s", self.name, count, peer, error)
            return None
        return Envelope(peer, message)

    def _authenticated(self, routing_frame: zmq.Frame) -> str | None:
        """The name of the key that sent a message (ZAP's User-Id), or None when its connection
        claims another name as routing id (counted, dropped). A peer that sets no routing id gets
        one from libzmq, which starts with a zero byte: then no one can hold a name first and
        lock its owner out, as a claimed routing id can without handover."""
        name = routing_frame.get("User-Id")
        routing_id = routing_frame.bytes
        if routing_id[:1] != b"\0" and routing_id != name.encode():
            self.refused_by_peer[name] += 1
            if _log_this_one(count := self.refused_by_peer[name]):
                log.warning("inbox %s: refused message #%d from key %r: its connection claims to be %r",
                            self.name, count, name, routing_id.decode("utf-8", "backslashreplace"))
            return None
        self._routes[name] = routing_id  # the latest connection of a key gets the replies
        return name

    def send(self, peer: str, message: wire.Message) -> bool:
        """Send `message` back on the connection of `peer` (an Envelope.peer), never blocking.

        How a node acknowledges an End it has checked, and how the launcher stops a node over the
        node's own connection. False, counted in unsent_by_peer and logged (rate-limited), when that
        peer is not connected (with CURVE: has sent nothing yet) or its queue is full; nothing is
        queued then.
        """
        routing_id = peer.encode() if self.config.curve is None else self._routes.get(peer)
        if routing_id is None:
            return self._unsent(peer, message, "no message from it yet")
        try:
            self._socket.send_multipart([routing_id, *wire.encode(message)], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as error:  # EHOSTUNREACH: not connected (ROUTER_MANDATORY); EAGAIN: full
            return self._unsent(peer, message, error)
        return True

    def _unsent(self, peer: str, message: wire.Message, why: object) -> bool:
        self.unsent_by_peer[peer] += 1
        if _log_this_one(count := self.unsent_by_peer[peer]):
            log.warning("inbox %s: could not send %s #%d to peer %r: %s", self.name, message.KIND, count,
                        peer, why)
        return False


def address_towards(endpoint: str) -> str:
    """The IP address of this machine's interface that reaches endpoint's host: where a node
    whose host address is `auto` binds. A UDP connect only picks the route; it sends nothing."""
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return probe.getsockname()[0]


class Peer(_Endpoint):
    """A connection to another process's inbox (DEALER, routing id = this process's `name`).

    Connecting never waits: messages queue (up to sndhwm) until the inbox is reachable. A
    connection that breaks (inbox gone, MAXMSGSIZE exceeded, heartbeat timeout) loses what was in
    flight on it; libzmq redials. End's seq lets the receiver count what arrived. What the inbox
    sends back on this connection (EndAck, the launcher's Stop) is read with `recv`.

    With CURVE, `server` names the process whose inbox this dials: the handshake succeeds only
    with the holder of that name's secret key. The inbox knows this peer by its key, so the peer
    claims no routing id.
    """

    def __init__(self, address: str, name: str, config: TransportConfig | None = None,
                 context: zmq.Context | None = None, server: str | None = None):
        routing_id = name.encode()
        if not 0 < len(routing_id) <= 255:
            raise ValueError(f"peer name must be 1 to 255 bytes of UTF-8, got {name!r}")
        curve = (config or TransportConfig()).curve
        if curve is not None and server is None:
            raise ValueError(f"peer {name!r}: with CURVE, name the server whose inbox it dials")
        server_key = None if curve is None else curve.server_key(server)
        super().__init__(zmq.DEALER, name, config, context)
        self.address = address
        if curve is None:
            self._socket.setsockopt(zmq.ROUTING_ID, routing_id)
        else:
            for option, value in ((zmq.CURVE_SERVERKEY, server_key), (zmq.CURVE_PUBLICKEY, curve.public_key),
                                  (zmq.CURVE_SECRETKEY, curve.secret_key)):
                self._socket.setsockopt(option, value)
        # Time out a silent inbox, but ask it for no TTL: it must not time us out (see config).
        self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, self.config.heartbeat_timeout_ms)
        self._socket.setsockopt(zmq.HEARTBEAT_TTL, 0)
        # A blocking send waits for room inside libzmq, one slice at a time: no exception and
        # no Python-level poll per message when the receiver is the slower side.
        self._socket.setsockopt(zmq.SNDTIMEO, self.config.poll_slice_ms)
        try:
            self._socket.connect(address)
        except zmq.ZMQError as error:
            raise self._fail(f"peer {name!r} cannot connect to {address}", error) from error
        self._replies = zmq.Poller()
        self._replies.register(self._socket, zmq.POLLIN)
        self.dropped_by_kind: Counter[str] = Counter()
        self._bad_messages = 0
        self._unexpected = 0

    @property
    def dropped(self) -> int:
        """Messages the "drop" policy discarded, of all kinds."""
        return sum(self.dropped_by_kind.values())

    @property
    def bad_messages(self) -> int:
        """Replies dropped because they failed to decode."""
        return self._bad_messages

    @property
    def unexpected(self) -> int:
        """Good replies that `end` met while waiting for its EndAck, and dropped."""
        return self._unexpected

    def send(self, msg: wire.Message) -> bool:
        """Queue `msg`; False when the "drop" policy discarded it because the receiver is full.

        Raises PeerTimeout when a "block" kind found no room within block_timeout_ms. Tensors of
        64 KiB and more are sent without a copy: do not modify them in place after sending.
        """
        frames = wire.encode(msg)
        if self.config.policy.get(msg.KIND, BLOCK) == DROP:
            try:
                self._socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.dropped_by_kind[msg.KIND] += 1
                return False
            return True
        self._send_waiting(frames, _deadline(self.config.block_timeout_ms), msg.KIND)
        return True

    def _send_waiting(self, frames: list[bytes | memoryview], deadline: float | None, kind: str) -> None:
        """Send, waiting for room until the deadline (checked every poll_slice_ms)."""
        while True:
            try:
                self._socket.send_multipart(frames, copy=False)
                return
            except zmq.Again:  # no room within a slice; multipart sends are atomic: nothing was queued
                if deadline is not None and time.monotonic() >= deadline:
                    raise PeerTimeout(f"peer {self.name!r} -> {self.address}: no room for {kind!r} "
                                      "before the timeout (receiver slow or gone)") from None

    def recv(self, timeout_ms: int = 0) -> wire.Message | None:
        """The next message the inbox at the other end sent back on this connection (an EndAck, a
        Stop), or None after timeout_ms (0: just look). Replies that fail to decode are counted in
        bad_messages and dropped; a stream of them does not hold recv past its deadline."""
        deadline = _deadline(timeout_ms)
        while _wait(self._replies, deadline, self.config.poll_slice_ms):
            frames = self._socket.recv_multipart(copy=False)
            try:
                return wire.decode(frames, self.config.limits)
            except wire.WireError as error:
                self._bad_messages += 1
                if _log_this_one(self._bad_messages):
                    log.warning("peer %s: dropped bad reply #%d from %s: %s", self.name, self._bad_messages,
                                self.address, error)
            if _expired(deadline):
                break
        return None

    def end(self, edge: str, seq: int, timeout_ms: int = 10_000) -> bool:
        """Send End(edge, seq) and wait for its EndAck: True once the receiving application has
        taken every message sent before it and accepted the End; False when no ack came within
        timeout_ms.

        Any other reply met while waiting (a Stop, an EndAck for another edge or seq) is dropped
        and counted in `unexpected`: where such replies matter, take them with `recv` first, or
        send the End with `send` and wait for its EndAck with `recv`.
        """
        deadline = time.monotonic() + timeout_ms / 1000
        try:
            self._send_waiting(wire.encode(wire.End(edge, seq)), deadline, "end")
        except PeerTimeout:
            return False
        while (reply := self.recv(_remaining_ms(deadline))) is not None:
            if isinstance(reply, wire.EndAck) and (reply.edge, reply.seq) == (edge, seq):
                return True
            self._unexpected += 1
            if _log_this_one(self._unexpected):
                log.warning("peer %s: dropped unexpected reply #%d from %s while ending %r: %s", self.name,
                            self._unexpected, self.address, edge, reply.KIND)
            if _expired(deadline):
                break
        return False
