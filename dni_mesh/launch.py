"""The launcher: start every node of a topology as a process on this machine and supervise it.

The launcher binds a control inbox; each node connects to it and sends Hello, Ready, Metrics,
Heartbeat and Error there, and ends that stream with End when it exits. The launcher keeps a
live view, writes every metrics message to `metrics.jsonl` in the run folder, and fails the run
as soon as a node dies past its restart policy (naming it and quoting its last output lines),
goes silent, or when the mesh stops advancing: every heartbeat carries the node's progress
counter, and once no node's progress has moved for `stall_s` the run fails naming each
unfinished node and what it waits for. A node that dies with restarts left (`restart: {max: N}`
in the topology) is started again with `--rejoin`: it continues from its newest checkpoint and
rejoins the running mesh while its peers keep learning. On SIGINT or SIGTERM it sends Stop to
every node, over the connection that node opened (nodes take Stop from nowhere else), waits
briefly, then kills what is left, so no process outlives the run.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import zmq

from dni_mesh import wire
from dni_mesh.checkpoint import saved_seqs
from dni_mesh.security import LAUNCHER, Curve, curve_for
from dni_mesh.forkserver import ForkServer, ForkServerFailed, node_environment
from dni_mesh.live import LiveView, restarts_text
from dni_mesh.topology import Topology, load_topology
from dni_mesh.transport import Inbox, TransportConfig, free_port_range

STOP_GRACE_S = 3.0
PLAN_FILE = "plan.json"
"""The mesh's plan in the run folder (`dni_mesh.build.Plan`): every node starts from it."""
STARTUP_S = 120.0
"""A node that is not Ready this long after its process started is taken as hung: the time to
import torch, load the data and build the node, on a loaded machine."""
SILENCE_S = 120.0
"""A Ready node silent this long is taken as hung. Nodes heartbeat every 0.5 s between steps;
the margin covers a slow single step."""
STALL_S = 30.0
"""Once every node is ready, a mesh in which no node's progress moved for this long is stuck."""


class NodeStart(enum.Enum):
    """How the launcher starts a node's process."""
    FORK = "fork"  # forked from a server that imported torch once (dni_mesh.forkserver): fast
    EXEC = "exec"  # a fresh interpreter per node; what a wrapped command (--hosts netns) needs


class NodeHandle(Protocol):
    """What the launcher needs of a node's process, wherever it runs: `subprocess.Popen`,
    `ForkedProcess`, or a process on a Ray cluster (`dni_mesh.ray_launcher`)."""
    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class NodeStarter(Protocol):
    """Starts node processes that this machine's process table does not hold (on a Ray
    cluster, say): the launcher gives it each node's command line, environment and log file,
    supervises what it returns like a local process, and asks it to kill what must die."""

    def start(self, name: str, arguments: list[str], env: dict[str, str], log_path: Path,
              append: bool) -> NodeHandle: ...

    def kill(self, name: str, process: NodeHandle) -> None: ...


class NodeFailed(RuntimeError):
    """A node process exited with an error; the message names it and quotes its output."""


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM reached the launcher."""


class PortInUse(RuntimeError):
    """A node's port is taken on this machine; the message names the keys that move it."""


class CannotResume(RuntimeError):
    """A run folder cannot be resumed; the message says what is missing or changed."""


def check_ports(topology: Topology) -> None:
    """Refuse to start when a node's port is taken (another mesh on this machine, say), naming
    the node, the keys that move it and a range that is free now. There is still a race with
    whoever binds next; this turns the common case into a clear error before anything starts."""
    for name, spec in topology.nodes.items():
        host = topology.hosts[spec.host]
        if topology.found_at_run_time(name):  # chosen when the node binds: free by definition
            continue
        with socket.socket() as probe:
            # As libzmq binds: connections of an earlier run lingering in TIME_WAIT do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host.address, spec.port))
            except OSError as error:
                if error.errno != errno.EADDRINUSE:  # not an address of this machine: the node says
                    continue
                count = sum(1 for n in topology.nodes.values() if n.host == spec.host)
                free = free_port_range(count, host.address)
                raise PortInUse(
                    f"node {name}: port {spec.port} on {host.address} is in use ({error.strerror}); "
                    f"move the mesh with --set 'hosts.{spec.host}={{address: {host.address}, "
                    f"base_port: {free}}}' (ports {free}-{free + count - 1} are free now), or give "
                    f"the node its own nodes.{name}.port"
                ) from None


@dataclass
class Outage:
    """A node's time down, from its death until its restarted process rejoined: what the run
    stood at when it died, to count what was lost and what its peers did meanwhile."""
    since: float
    steps: int  # the dead process's step counter, as last reported
    peer_steps: dict[str, int]  # every other node's step counter, as last reported


@dataclass
class NodeProcess:
    """One node's process and what the launcher has heard from it."""
    name: str
    process: NodeHandle
    log_path: Path
    hello: wire.Hello | None = None
    address: str | None = None  # where its inbox listens (`wire.Bound`), kept across restarts
    bound: bool = False  # this process has said where it listens (it binds once)
    told: bool = False  # this process was sent its neighbours' addresses (`wire.Peers`)
    ready: bool = False
    latest: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    last_heard: float = field(default_factory=time.monotonic)
    progress: int = 0
    advanced: float = field(default_factory=time.monotonic)  # when progress last moved
    waiting_for: str = "(not reported)"
    first_step_s: float | None = None  # its first training step, in seconds since the run began
    steps: int = 0  # its step counter (Metrics.step), as last reported
    restarts: int = 0
    down: Outage | None = None  # while it is dead or restarted but not yet rejoined
    down_s: float = 0.0  # this and the next two: summed over its outages
    steps_lost: int = 0
    peer_steps_while_down: int = 0

    def done(self) -> bool:
        return bool(self.final) or self.process.poll() == 0

    def restarted(self, process: NodeHandle, now: float) -> None:
        """Watch the process that replaces a dead one as a new start: it must say hello and be
        ready within STARTUP_S, and what its predecessor said no longer counts."""
        self.process, self.hello, self.final = process, None, {}
        self.bound = self.told = self.ready = False
        self.started = self.last_heard = self.advanced = now
        self.waiting_for = "(not reported)"

    def tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


Wrap = Callable[[str, list[str]], list[str]]
"""Turns a node's command into the one to run (e.g. inside a network namespace)."""


def no_wrap(node: str, command: list[str]) -> list[str]:
    return command


def launcher_curve(topology: Topology) -> Curve | None:
    """The launcher's CURVE keys when the topology turns CURVE on: its control inbox then
    admits the mesh's nodes only (SecurityError names a missing or unsafe key file)."""
    if topology.curve_keys is None:
        return None
    return curve_for(topology.curve_keys, LAUNCHER, topology.nodes)


def node_arguments(topology: Topology, name: str, overrides: Sequence[str], control: str,
                   run_dir: Path, resume_at: int | None = None, rejoin: bool = False) -> list[str]:
    """The `dni-mesh` command line of a node: the same whether it is forked or executed.
    `rejoin`: a restart, from the node's newest checkpoint, into the running mesh."""
    arguments = ["node", str(topology.path), "--name", name, "--control", control,
                 "--run-dir", str(run_dir), "--plan", str(run_dir / PLAN_FILE)]
    if resume_at is not None:
        arguments += ["--resume", str(resume_at)]
    if rejoin:
        arguments.append("--rejoin")
    for override in overrides:
        arguments += ["--set", override]
    return arguments


def default_run_dir(topology: Topology) -> Path:
    return Path("runs") / f"{topology.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


class Launcher:
    """Starts, watches and stops the node processes of one run."""

    def __init__(self, topology: Topology, overrides: Sequence[str], run_dir: Path,
                 live: bool = True, wrap: Wrap = no_wrap, control_host: str = "127.0.0.1",
                 silence_s: float = SILENCE_S, stall_s: float = STALL_S, quiet: bool = False,
                 tensorboard: bool = False, forkserver: ForkServer | None = None,
                 started: float | None = None, resume_at: int | None = None,
                 starter: NodeStarter | None = None):
        self.board = None  # first: MissingExtra (no tensorboard package) before any socket opens
        if tensorboard:
            from dni_mesh.tensorboard import TensorBoardLog
            self.board = TensorBoardLog(run_dir / "tensorboard")
        self.topology = topology
        self.overrides = list(overrides)
        self.run_dir = run_dir
        self.wrap = wrap
        self.forkserver = forkserver  # None: every node is a fresh interpreter (NodeStart.EXEC)
        self.starter = starter  # not None: it starts every node, elsewhere (neither of the above)
        self.resume_at = resume_at  # every node resumes from its checkpoint saved before this seq
        self.started = time.monotonic() if started is None else started
        self.context = zmq.Context()
        # Linger 0: the launcher only answers Ends and sends Stops, and closes once every node
        # has exited. Control messages carry no tensors: nothing bigger than a header is taken.
        config = TransportConfig(linger_ms=0, max_msg_bytes=wire.DEFAULT_LIMITS.max_header_bytes,
                                 limits=replace(wire.DEFAULT_LIMITS, max_tensors=0),
                                 curve=launcher_curve(topology))
        self.inbox = Inbox(f"tcp://{control_host}:0", LAUNCHER, config, self.context)
        self.nodes: dict[str, NodeProcess] = {}
        self.silence_s = silence_s
        self.stall_s = stall_s
        self.view = LiveView(topology, enabled=live, quiet=quiet)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = (run_dir / "metrics.jsonl").open("w" if resume_at is None else "a")

    def start(self) -> None:
        env = node_environment()  # for its data folder
        # What `dni-mesh plot --rdm` (dni_mesh.rdm) needs to rebuild the stages after the run.
        shutil.copyfile(self.topology.path, self.run_dir / "topology.yaml")
        data_dir = self.topology.data.data_dir or env.get("DNI_MESH_DATA")
        (self.run_dir / "run.json").write_text(json.dumps(
            {"overrides": self.overrides, "topology": str(self.topology.path),
             "root": str(self.topology.root), "data_dir": data_dir and str(data_dir)},
            indent=2) + "\n")
        for name in self.topology.nodes:
            # A resumed run continues its nodes' logs.
            process = self.start_node(name, resume_at=self.resume_at,
                                      append=self.resume_at is not None)
            self.nodes[name] = NodeProcess(name, process, self.log_path(name))
        self.write_pids()

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def start_node(self, name: str, resume_at: int | None = None, append: bool = False,
                   rejoin: bool = False) -> NodeHandle:
        """Start one node's process, forked, executed or by the starter, its output into
        NODE.log: for the run's start and for each restart alike."""
        env = {**node_environment(), "OMP_NUM_THREADS": str(self.topology.nodes[name].threads)}
        overrides = self.overrides
        if name in self.nodes and self.nodes[name].address is not None:
            # A restart listens where its peers already dial: the port it was given, or chose.
            overrides = [*overrides, f"nodes.{name}.port={self.nodes[name].address.rsplit(':', 1)[1]}"]
        arguments = node_arguments(self.topology, name, overrides, self.inbox.address,
                                   self.run_dir, resume_at, rejoin)
        log_path = self.log_path(name)
        if self.starter is not None:
            return self.starter.start(name, arguments, env, log_path, append)
        if self.forkserver is not None:
            try:
                return self.forkserver.start(arguments, env, log_path, Path.cwd(), append)
            except ForkServerFailed as error:
                raise NodeFailed(f"node {name} could not start: {error}") from None
        command = self.wrap(name, [sys.executable, "-m", "dni_mesh.cli", *arguments])
        with log_path.open("a" if append else "w") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def write_pids(self) -> None:
        """nodes.json: the pid of each node's current process, for whoever must signal it."""
        pids = {name: node.process.pid for name, node in self.nodes.items()}
        (self.run_dir / "nodes.json").write_text(json.dumps(pids, indent=2) + "\n")

    def supervise(self) -> None:
        """Return when every node exited 0; raise NodeFailed when one did not."""
        with self.view:
            while True:
                envelope = self.inbox.recv(200)
                if envelope is not None:
                    self.take(envelope.peer, envelope.message)
                self.view.refresh(self.nodes)
                codes = {n: p.process.poll() for n, p in self.nodes.items()}
                now = time.monotonic()
                for name, code in codes.items():
                    if code not in (None, 0) and self.restarts_left(self.nodes[name]):
                        self.restart(self.nodes[name], code, now)
                    else:
                        self.check_alive(self.nodes[name], code, now)
                if all(code == 0 for code in codes.values()):
                    self.drain()
                    return
                self.check_progress(now)

    def check_alive(self, node: NodeProcess, code: int | None, now: float) -> None:
        """Fail the run when the node died, or did not get ready, or went silent once ready."""
        if code not in (None, 0):
            problem = (f"exited with code {code} after {restarts_text(node.restarts)} (restart: "
                       f"{{max: {self.topology.nodes[node.name].max_restarts}}})")
        elif code is None and not node.ready and now - node.started > STARTUP_S:
            problem = f"was not ready {STARTUP_S:.0f} s after it started (hung?)"
        elif code is None and node.ready and now - node.last_heard > self.silence_s:
            problem = f"sent no heartbeat or metrics for {self.silence_s:.0f} s (hung?)"
        else:
            return
        raise NodeFailed(f"node {node.name} (pid {node.process.pid}) {problem}; its last output "
                         f"({node.log_path}):\n{node.tail()}")

    def restarts_left(self, node: NodeProcess) -> bool:
        return node.restarts < self.topology.nodes[node.name].max_restarts

    def restart(self, node: NodeProcess, code: int, now: float) -> None:
        """Start a dead node again, from its newest checkpoint, to rejoin the mesh while its
        peers keep running. Its outage lasts until it reports `rejoined`; a node that dies again
        before that is still in the same outage."""
        if node.down is None:
            node.down = Outage(now, node.steps, {n.name: n.steps for n in self.nodes.values()
                                                 if n is not node})
        dead = node.process.pid
        node.restarts += 1
        node.restarted(self.start_node(node.name, append=True, rejoin=True), now)
        self.write_pids()
        self.record(node, {"event": "restart", "node": node.name, "step": node.steps,
                           "restarts": node.restarts, "exit_code": code, "status": "restarting"})
        self.view.note(f"node {node.name} (pid {dead}) exited with code {code}; restarting it "
                       f"from its checkpoint as pid {node.process.pid} (restart {node.restarts} "
                       f"of {self.topology.nodes[node.name].max_restarts})")

    def rejoined(self, node: NodeProcess, values: dict, now: float) -> dict:
        """End the node's outage when its restarted process says it rejoined (its record has
        the `steps` it resumed with): add the time down, the steps lost and the steps its peers
        took meanwhile, and return them for the record."""
        down, steps = node.down, values.get("steps")
        if down is None:  # a record no restart asked for: no outage to count
            return {}
        node.down, node.advanced = None, now  # the mesh's stall clock restarts with it
        outage = {"down_s": round(now - down.since, 3),
                  "steps_lost": max(0, down.steps - steps) if isinstance(steps, int) else 0,
                  "peer_steps_while_down": sum(max(0, self.nodes[name].steps - before)
                                               for name, before in down.peer_steps.items())}
        node.down_s += outage["down_s"]
        node.steps_lost += outage["steps_lost"]
        node.peer_steps_while_down += outage["peer_steps_while_down"]
        self.view.note(f"node {node.name} rejoined at seq {values.get('seq')} after "
                       f"{outage['down_s']:.1f} s down (from its checkpoint before seq "
                       f"{values.get('checkpoint_seq')}; {outage['steps_lost']} steps lost, its "
                       f"peers took {outage['peer_steps_while_down']} steps meanwhile)")
        return {**outage, "status": "rejoined"}

    def check_progress(self, now: float) -> None:
        """Fail the run when every node is ready and none has advanced for stall_s. While a
        restarted node has not rejoined, its peers may rightly wait for it: it has STARTUP_S."""
        if any(node.down is not None and now - node.started <= STARTUP_S
               for node in self.nodes.values()):
            return
        if not all(node.ready or node.done() for node in self.nodes.values()):
            return
        working = [node for node in self.nodes.values() if not node.done()]
        if not working or now - max(node.advanced for node in working) <= self.stall_s:
            return
        stuck = "\n".join(f"  node {node.name} (pid {node.process.pid}, progress {node.progress}) "
                          f"waits for {node.waiting_for}" for node in working)
        raise NodeFailed(f"no node advanced for {self.stall_s:.0f} s: the mesh is stuck\n{stuck}")

    def drain(self) -> None:
        """Take the control messages that were sent just before the processes exited."""
        while (envelope := self.inbox.recv(0)) is not None:
            self.take(envelope.peer, envelope.message)

    def take(self, peer: str, message: wire.Message) -> None:
        node = self.nodes.get(peer)
        if node is None:
            return
        now = node.last_heard = time.monotonic()
        if isinstance(message, wire.Hello):
            node.hello = message
        elif isinstance(message, wire.Bound):
            self.take_bound(node, message.address)
        elif isinstance(message, wire.Ready):
            node.ready, node.advanced = True, now
        elif isinstance(message, wire.Heartbeat):
            if message.step != node.progress:
                node.progress, node.advanced = message.step, now
        elif isinstance(message, wire.End):
            self.inbox.send(peer, wire.EndAck(message.edge, message.seq))
        elif isinstance(message, wire.Metrics):
            node.steps = message.step
            self.take_metrics(node, message, now)
        elif isinstance(message, wire.Error):
            node.latest["error"] = message.text

    def take_bound(self, node: NodeProcess, address: str) -> None:
        """Note where a node listens, then tell every node whose neighbours have all bound where
        they are (`wire.Peers`): the node dials them only then. A restarted node must listen
        where its peers already dial it (`start_node` pins a port chosen at run time). A process
        binds once: a second `bound` under its name is not its own and changes nothing."""
        if node.bound:
            return  # dropped, as the launcher drops what names no node of the mesh
        node.bound = True
        if node.address is not None and address != node.address:
            raise NodeFailed(f"node {node.name} restarted listening at {address}, but its peers "
                             f"dial it at {node.address}: a restarted node must come back on the "
                             "same machine (pin it with its host's ray resources)")
        node.address = address
        for waiting in self.nodes.values():
            wanted = sorted(self.topology.neighbours(waiting.name))
            if waiting.address is None or waiting.told or any(self.nodes[n].address is None
                                                              for n in wanted):
                continue
            self.inbox.send(waiting.name, wire.Peers({n: self.nodes[n].address for n in wanted}))
            waiting.told = True

    def take_metrics(self, node: NodeProcess, message: wire.Metrics, now: float) -> None:
        if message.values.get("event") == "waiting":
            node.waiting_for = str(message.values.get("waiting_for"))
            return
        values = dict(message.values, node=node.name, step=message.step)
        event = values.get("event")
        if event == "step" and node.first_step_s is None:
            node.first_step_s = round(now - self.started, 3)
        elif event == "rejoined":
            values.update(self.rejoined(node, values, now))
        self.record(node, values)
        if event == "eval":
            node.evals.append(values)
        elif event == "final":
            node.final = values

    def record(self, node: NodeProcess, values: dict) -> None:
        """Into metrics.jsonl (and TensorBoard) and the live view: a node's record, or one the
        launcher makes about it (a restart)."""
        self.metrics.write(json.dumps(values) + "\n")
        if self.board is not None:
            self.board.log(node.name, values)
        node.latest.update(values)

    def stop(self, reason: str) -> None:
        """Ask every live node to stop, then kill whatever is left after the grace period."""
        live = [n for n in self.nodes.values() if n.process.poll() is None]
        for node in live:  # never blocks: a node too busy to take Stop is killed below
            self.inbox.send(node.name, wire.Stop(node.name, reason))
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(n.process.poll() is None for n in live):
            envelope = self.inbox.recv(50)  # a stopping node waits for the ack of its End
            if envelope is not None:
                self.take(envelope.peer, envelope.message)
        for node in self.nodes.values():
            if node.process.poll() is None:
                self.kill(node)

    def kill(self, node: NodeProcess) -> None:
        """SIGKILL the node's process group (a wrapped command's children too), or have the
        starter that started it kill it where it runs."""
        if self.starter is not None:
            self.starter.kill(node.name, node.process)
        else:
            os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait()

    def close(self) -> None:
        self.metrics.close()
        if self.board is not None:
            self.board.close()
        self.inbox.close()
        self.context.term()

    def summary(self, wall_s: float) -> dict:
        t = self.topology
        heads = [self.nodes[h] for h in t.heads]
        evals = heads[0].evals if heads else []
        return {
            "name": t.name, "mode": t.mode, "epochs": t.data.epochs,
            "test_accuracy": evals[-1]["test_accuracy"] if evals else None,
            "test_accuracy_per_eval": [e["test_accuracy"] for e in evals],
            # A language model's head (labels per token) also reports bits per token.
            "test_bits_per_token": evals[-1].get("test_bits_per_token") if evals else None,
            "train_samples_per_s": heads[0].final.get("samples_per_s") if heads else None,
            "wall_s": round(wall_s, 3), "run_dir": str(self.run_dir),
            "control_refused_connections": self.inbox.refused_connections,
            # Start-up: from the call of run() until the head's first training step.
            "first_step_s": heads[0].first_step_s if heads else None,
            "nodes": {name: {"pid": n.process.pid, "role": t.nodes[name].role,
                             "host": t.nodes[name].host,
                             "address": n.address or t.nodes[name].address,
                             "steps": n.final.get("steps"),
                             "eval_batches": n.final.get("eval_batches"),
                             "bad_messages": n.final.get("bad_messages"),
                             "unexpected": n.final.get("unexpected"),
                             "rejected": n.final.get("rejected"),
                             "dropped_messages": n.final.get("dropped_messages"),
                             "expired": n.final.get("expired"),
                             # CURVE: messages from a connection whose key is not the name it
                             # claims, and handshakes refused (no key, a foreign key).
                             "refused": n.final.get("refused"),
                             "refused_connections": n.final.get("refused_connections"),
                             "max_rss_mb": n.final.get("max_rss_mb"),
                             "first_step_s": n.first_step_s,
                             # Restarts (the topology's `restart` policy) and what they cost.
                             "restarts": n.restarts, "down_s": round(n.down_s, 3),
                             "steps_lost": n.steps_lost,
                             "peer_steps_while_down": n.peer_steps_while_down}
                      for name, n in self.nodes.items()},
        }


def run(topology_path: str | Path, overrides: Sequence[str] = (), run_dir: Path | None = None,
        summary_path: Path | None = None, live: bool = True, wrap: Wrap = no_wrap,
        topology: Topology | None = None, control_host: str = "127.0.0.1",
        silence_s: float = SILENCE_S, stall_s: float = STALL_S, quiet: bool = False,
        tensorboard: bool = False, start: NodeStart = NodeStart.FORK,
        forkserver: ForkServer | None = None, resume_at: int | None = None,
        starter: NodeStarter | None = None) -> dict:
    """Run a whole mesh on this machine; returns (and optionally writes) the summary.

    The Python API of `dni-mesh run`: `live` shows the live table on a terminal, `quiet` prints
    nothing at all (no live table, epochs, evaluations or final table). `tensorboard` also
    writes event files into RUN_DIR/tensorboard (the `tensorboard` extra). It may be called from
    any thread; only in the main thread does it take over SIGINT and SIGTERM.

    `wrap` changes each node's command and `control_host` is the address the launcher's control
    inbox binds, which every node must reach (e.g. `dni_mesh.netns.Network` gives both).

    `start` is how node processes start (`NodeStart`); a `wrap`ped command is always executed.
    `forkserver`: one already started (the CLI starts it before its own imports, so that they
    overlap); the caller closes it. Without one, run() starts and closes its own.

    `starter`: starts every node instead (`NodeStarter`, e.g. on a Ray cluster:
    `dni_mesh.ray_launcher.run_on_ray`); `start`, `forkserver` and `wrap` are then unused, and
    `control_host` must be an address of this machine that the nodes reach.

    `resume_at`: continue the run in `run_dir` from every node's checkpoint saved before this
    seq (`resume` finds it).

    `silence_s` and `stall_s` bound how long a node may send nothing and how long the mesh may
    make no progress before the run fails.

    Raises TopologyError before anything starts, PortInUse when a node's port is taken (checked
    before anything starts, for nodes on this machine's network), NodeFailed when a node dies,
    Interrupted on SIGINT/SIGTERM; in every case no node process is left behind.
    """
    started = time.monotonic()
    topology = topology or load_topology(topology_path, overrides)
    run_dir = Path(run_dir) if run_dir is not None else None
    # First, so that its imports overlap ours and the plan's dry runs below.
    own = forkserver is None and start is NodeStart.FORK and wrap is no_wrap and starter is None
    if own:
        forkserver = ForkServer(node_environment())
    elif start is NodeStart.EXEC or wrap is not no_wrap or starter is not None:
        forkserver = None
    try:
        from dni_mesh.build import resolve_plan  # imports torch: after the fork server started
        plan = resolve_plan(topology)  # a mesh that cannot run is refused here (TopologyError)
        if wrap is no_wrap:
            check_ports(topology)
        run_dir = run_dir or default_run_dir(topology)
        if resume_at is not None:
            check_same_plan(run_dir, topology)
        launcher = Launcher(topology, overrides, run_dir, live=live, wrap=wrap,
                            control_host=control_host, silence_s=silence_s, stall_s=stall_s,
                            quiet=quiet, tensorboard=tensorboard, forkserver=forkserver,
                            started=started, resume_at=resume_at, starter=starter)
    except BaseException:
        if own:
            forkserver.close()
        raise
    plan.save(run_dir / PLAN_FILE, topology)

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(f"{signal.Signals(signum).name} received")

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        launcher.start()
        launcher.supervise()
    except BaseException as error:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        launcher.stop(f"launcher: {error.__class__.__name__}")
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        launcher.close()
        if own:
            forkserver.close()
    summary = launcher.summary(time.monotonic() - started)
    launcher.view.final_table(launcher.nodes, summary)
    if summary_path is not None:
        Path(summary_path).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def resume(run_dir: str | Path, overrides: Sequence[str] = (), **options) -> dict:
    """Continue a stopped or failed run in its own folder, from the newest seq at which every
    node saved a checkpoint; returns the summary of the part run now. The topology file and
    overrides are the run's (run.json); `overrides` are added to them, and may change anything
    but what decides shapes (refused: CannotResume). Other options as `run`'s."""
    topology, overrides = resumed_topology(Path(run_dir), overrides)
    return run(topology.path, overrides, run_dir=Path(run_dir), topology=topology,
               resume_at=resume_point(Path(run_dir), topology), **options)


def resumed_topology(run_dir: Path, overrides: Sequence[str] = ()) -> tuple[Topology, list[str]]:
    """The topology a run folder ran (its run.json names the file and the overrides), loaded
    with `overrides` added; and all the overrides."""
    try:
        saved = json.loads((run_dir / "run.json").read_text())
        path, combined = Path(saved["topology"]), [*saved["overrides"], *overrides]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CannotResume(f"{run_dir}: not the folder of a `dni-mesh run` ({error})") from None
    if not path.is_file():
        raise CannotResume(f"{run_dir}: its topology file {path} is gone")
    return load_topology(path, combined), combined


def resume_point(run_dir: Path, topology: Topology) -> int:
    """The newest seq before which every node of the topology saved a checkpoint."""
    saved = {name: saved_seqs(run_dir, name) for name in topology.nodes}
    missing = [name for name, seqs in saved.items() if not seqs]
    if missing:
        raise CannotResume(f"{run_dir}: no checkpoint of {', '.join(missing)} (a node saves "
                           "every `checkpoint.every` seqs and after each evaluation)")
    seq = min(seqs[0] for seqs in saved.values())
    lacking = [f"{name} (has {', '.join(map(str, seqs))})" for name, seqs in saved.items()
               if seq not in seqs]
    if lacking:
        raise CannotResume(f"{run_dir}: the newest checkpoint every node could share is before "
                           f"seq {seq}, which {', '.join(lacking)} no longer has")
    return seq


def check_same_plan(run_dir: Path, topology: Topology) -> None:
    """Refuse to resume a run whose file or overrides now give other shapes than it ran with."""
    from dni_mesh.build import plan_digest
    try:
        digest = json.loads((run_dir / PLAN_FILE).read_text())["digest"]
    except (OSError, ValueError, KeyError) as error:
        raise CannotResume(f"{run_dir}: no readable {PLAN_FILE} ({error})") from None
    if digest != plan_digest(topology):
        raise CannotResume(f"{run_dir}: {topology.path} with these overrides has other nodes, "
                           "edges or data than the run had; a resumed run keeps its shapes")
