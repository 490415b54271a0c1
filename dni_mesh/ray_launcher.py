"""The Ray launcher: every node of a mesh runs as a process on a Ray cluster, placed by Ray.

The launcher of `dni_mesh.launch` supervises the run as it does on one machine (control inbox,
live view, metrics, failure reports, SIGINT); only how a node's process starts and dies changes.
For each mesh node a Ray actor is created that holds the node's Ray resources (the topology's
`ray` key: so Ray places it on a Ray node that has them), and that actor starts
`python -m dni_mesh.cli node ...` as a subprocess on its Ray node. Ray places and tears down;
the node process itself is the same one the local launcher starts, talking ZeroMQ to its peers
and to the launcher's inbox directly, never through Ray.

The node's output comes back to NODE.log in the run folder through the actor, its exit code
through a call that returns when the process ends, and where it ran (Ray node id, address,
pid) into ray.json in the run folder. However the run ends, every node process is killed and
every actor with it; a Ray instance the launcher started is shut down.

Ray is the `ray` extra; nothing else in dni_mesh imports this module or Ray.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from dni_mesh.forkserver import NODE_ENVIRONMENT
from dni_mesh.launch import NodeFailed, default_run_dir, run
from dni_mesh.plot import MissingExtra
from dni_mesh.topology import NodeSpec, Topology, load_topology

RAY_EXTRA = "pip install 'dni_mesh[ray]'"
PLACEMENT_FILE = "ray.json"
"""Where each node ran: Ray node id and address, the node's pid and its actor's pid."""
PLACE_S = 120.0
"""How long a node's actor may wait for a Ray node with the resources it asks for."""
KILL_S = 30.0
"""How long killing a node's process through its actor may take before the actor is killed."""
CHUNK = 1 << 16
PASSED_ENVIRONMENT = ("PYTHONUNBUFFERED", "OMP_NUM_THREADS", *NODE_ENVIRONMENT)
"""What a node takes from the launcher's environment (besides DNI_MESH_*): the rest is its Ray
worker's, which belongs to its machine (paths, libraries)."""
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""0: Ray keeps 127.0.0.1 as the address of this machine's Ray node (read when Ray is imported)."""
KILLED = -signal.SIGKILL
"""The exit code of a node whose actor or Ray node was lost: as subprocess reports a SIGKILL."""


def import_ray(loopback: bool) -> ModuleType:
    """Ray, or MissingExtra naming the extra that installs it. `loopback`: the Ray instance
    this process starts is to bind 127.0.0.1, which Ray replaces with this machine's outward
    address unless told at its import that the cluster stays on this machine."""
    if loopback and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ONLY, "0")
    try:
        import ray
    except ImportError:
        raise MissingExtra(f"--launcher ray needs Ray, the `ray` extra: {RAY_EXTRA}") from None
    return ray


class NodeRunner:
    """Runs inside one Ray actor, on the Ray node Ray placed it on: starts the mesh node's
    process there, hands its output and exit code to the launcher, and kills it on request.
    A restarted node is a new process in the same actor."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def start(self, arguments: list[str], env: dict[str, str], cwd: str) -> dict[str, Any]:
        """Start the node (in its own session, so that a kill takes its whole group) and say
        where it runs."""
        import ray
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dni_mesh.cli", *arguments], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **env},
            cwd=cwd if os.path.isdir(cwd) else None, start_new_session=True)
        return {"ray_node_id": ray.get_runtime_context().get_node_id(),
                "pid": self.process.pid, "actor_pid": os.getpid()}

    def read(self, process_pid: int) -> bytes:
        """The node's next output, as soon as there is some; b"" once it has ended (or when
        a newer process has replaced the one asked about)."""
        if self.process is None or self.process.pid != process_pid:
            return b""
        return os.read(self.process.stdout.fileno(), CHUNK)

    def wait(self, process_pid: int) -> int:
        """Return the node's exit code when it ends."""
        if self.process is None or self.process.pid != process_pid:
            return KILLED
        return self.process.wait()

    def kill(self) -> None:
        """SIGKILL the node's process group if it still runs, and reap it."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()


class RayProcess:
    """A node's process on the cluster, as the launcher watches a local one (NodeHandle): its
    pid is the one on its Ray node. A thread copies its output into NODE.log."""

    def __init__(self, ray: ModuleType, actor: Any, where: dict[str, Any], log_path: Path,
                 append: bool):
        self.ray, self.pid = ray, where["pid"]
        self.returncode: int | None = None
        self.exit = actor.wait.remote(self.pid)
        self.copier = threading.Thread(target=self.copy_output, daemon=True,
                                       args=(actor, log_path, append))
        self.copier.start()

    def copy_output(self, actor: Any, log_path: Path, append: bool) -> None:
        with log_path.open("ab" if append else "wb") as log:
            while chunk := self.fetch(actor):
                log.write(chunk)
                log.flush()

    def fetch(self, actor: Any) -> bytes:
        try:
            return self.ray.get(actor.read.remote(self.pid))
        except self.ray.exceptions.RayError:  # the actor is gone: so is the node
            return b""

    def poll(self) -> int | None:
        """The exit code once the node ended; its output is in NODE.log by then, for the
        failure report that quotes it."""
        if self.returncode is None and self.ray.wait([self.exit], timeout=0)[0]:
            self.returncode = self.exit_code()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            ready = self.ray.wait([self.exit], timeout=timeout)[0]
            if not ready:
                raise subprocess.TimeoutExpired(f"node pid {self.pid}", timeout)
            self.returncode = self.exit_code()
        return self.returncode

    def exit_code(self) -> int:
        try:
            code = self.ray.get(self.exit)
        except self.ray.exceptions.RayError:  # the actor or its Ray node was lost
            code = KILLED
        self.copier.join(timeout=KILL_S)
        return code


def placement(spec: NodeSpec) -> dict[str, Any]:
    """The Ray options of a node's actor: the topology's `ray` key, by default the node's
    thread count in CPUs and one GPU when it computes on cuda. The actor holds them as long as
    the node runs, so Ray packs no more onto a Ray node than it has."""
    ray = spec.ray or {}
    num_cpus = ray.get("num_cpus")
    num_gpus = ray.get("num_gpus")
    return {"num_cpus": spec.threads if num_cpus is None else num_cpus,
            "num_gpus": (1 if spec.device.startswith("cuda") else 0) if num_gpus is None
            else num_gpus,
            "resources": dict(ray.get("resources", {})),
            "max_concurrency": 4}  # start, read, wait and kill of one node run side by side


def node_env(env: dict[str, str]) -> dict[str, str]:
    """What of the launcher's node environment a node on a Ray node takes."""
    return {key: value for key, value in env.items()
            if key in PASSED_ENVIRONMENT or key.startswith("DNI_MESH")}


def init_options(address: str | None, topology: Topology) -> dict[str, Any]:
    """`ray.init`'s arguments: connect to the cluster at `address` ("auto": the one started on
    this machine with `ray start`), or without one start a private Ray instance on this machine,
    bound to 127.0.0.1, that has every CPU and custom resource the mesh asks for: as the local
    launcher, it runs every node here however few cores there are. Node output comes to
    NODE.log, not to this terminal."""
    quiet = {"log_to_driver": False, "logging_level": "warning"}
    if address is not None:
        return {"address": address, **quiet}
    wanted = [placement(spec) for spec in topology.nodes.values()]
    resources: dict[str, float] = {}
    for options in wanted:
        for key, amount in options["resources"].items():
            resources[key] = resources.get(key, 0.0) + amount
    return {"address": "local", "_node_ip_address": "127.0.0.1", "include_dashboard": False,
            "num_cpus": math.ceil(sum(options["num_cpus"] for options in wanted)),
            "resources": resources, **quiet}


class RayStarter:
    """Starts the mesh's nodes on a Ray cluster (the launcher's NodeStarter), and on close
    leaves nothing of the run on it. Use it as a context manager."""

    def __init__(self, topology: Topology, address: str | None, run_dir: Path):
        self.ray = import_ray(loopback=address is None)
        self.owns = not self.ray.is_initialized()  # a caller's Ray connection stays the caller's
        if self.owns:
            self.ray.init(**init_options(address, topology))
        self.run_dir = run_dir
        self.placements: dict[str, dict[str, Any]] = {}
        self.wanted = {name: placement(spec) for name, spec in topology.nodes.items()}
        self.runner = self.ray.remote(NodeRunner)
        self.actors: dict[str, Any] = {}
        try:  # all at once: Ray starts their worker processes while the launcher sets up
            for name in self.wanted:
                self.actors[name] = self.new_actor(name)
        except BaseException:
            self.close()  # what was made so far, and a Ray instance begun here
            raise

    def new_actor(self, name: str) -> Any:
        return self.runner.options(**self.wanted[name]).remote()

    def __enter__(self) -> RayStarter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self, name: str, arguments: list[str], env: dict[str, str], log_path: Path,
              append: bool) -> RayProcess:
        try:
            where = self.placed(name, arguments, env)
        except self.ray.exceptions.RayActorError:  # its actor was killed or lost with its Ray node
            self.actors[name] = self.new_actor(name)
            where = self.placed(name, arguments, env)
        actor = self.actors[name]
        addresses = {node["NodeID"]: node["NodeManagerAddress"] for node in self.ray.nodes()}
        self.placements[name] = {**where, "address": addresses.get(where["ray_node_id"])}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / PLACEMENT_FILE).write_text(json.dumps(self.placements, indent=2) + "\n")
        return RayProcess(self.ray, actor, where, log_path, append)

    def placed(self, name: str, arguments: list[str], env: dict[str, str]) -> dict[str, Any]:
        """Start the node's process through its actor; where it runs (NodeRunner.start)."""
        start = self.actors[name].start.remote(arguments, node_env(env), str(Path.cwd()))
        try:
            return self.ray.get(start, timeout=PLACE_S)
        except self.ray.exceptions.GetTimeoutError:
            raise NodeFailed(self.unplaced(name)) from None

    def unplaced(self, name: str) -> str:
        """Why a node did not start: no Ray node had what it asks for, in time."""
        wanted = {k: v for k, v in self.wanted[name].items() if k != "max_concurrency"}
        return (f"node {name} was not placed on the Ray cluster within {PLACE_S:.0f} s: it asks "
                f"for {wanted} (the topology's `ray` key), and the cluster has "
                f"{self.ray.available_resources()} free of {self.ray.cluster_resources()}")

    def kill(self, name: str, process: RayProcess) -> None:
        """Kill the node's process through its actor; if the actor does not answer, the actor."""
        try:
            self.ray.get(self.actors[name].kill.remote(), timeout=KILL_S)
        except self.ray.exceptions.RayError:
            self.ray.kill(self.actors[name])

    def close(self) -> None:
        """Kill every node process that still runs, then every actor; shut down the Ray instance
        this starter began."""
        kills = [actor.kill.remote() for actor in self.actors.values()]
        try:
            self.ray.get(kills, timeout=KILL_S)
        except self.ray.exceptions.RayError:
            pass  # an actor that is gone took its node with it, or is killed next
        for actor in self.actors.values():
            self.ray.kill(actor)
        if self.owns:
            self.ray.shutdown()


def run_on_ray(topology_path: str | Path, overrides: Sequence[str] = (),
               address: str | None = None, run_dir: Path | None = None,
               topology: Topology | None = None, **options: Any) -> dict:
    """Run a whole mesh on a Ray cluster; returns the summary, as `dni_mesh.launch.run`, whose
    other options it takes. `address`: the cluster's (None: a private Ray instance on this
    machine). The nodes must reach the launcher's control inbox at `control_host` (default
    127.0.0.1: a cluster on this machine). Raises MissingExtra without Ray."""
    topology = topology or load_topology(topology_path, overrides)
    run_dir = run_dir or default_run_dir(topology)
    with RayStarter(topology, address, run_dir) as starter:
        return run(topology.path, overrides, run_dir=run_dir, topology=topology, starter=starter,
                   **options)
