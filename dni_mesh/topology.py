"""Topology files: a mesh described in YAML, checked and resolved before any process starts.

The launcher, every node process and `dni-mesh validate` read the same file through
`load_topology`, so a typo, a cycle or a port clash is reported once, with file, key and line,
instead of as a hung mesh of processes. The result is frozen dataclasses with every default
filled in, so the runtime never re-derives a setting. The file is trusted configuration: it names
code to import (unlike wire bytes, which are never trusted). The YAML reading and the key schema
live in `dni_mesh.topology_file`; this module gives them their meaning.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dni_mesh.topology_file import (DataFile, EdgeFile, LinkFile, NodeFile, RawTopology,
                                    SettingsFile, TopologyError, TopologyFile, read_topology,
                                    unknown)

__all__ = ["DataSpec", "EdgeSpec", "HostSpec", "LinkSpec", "NodeSpec", "Topology",
           "TopologyError", "describe", "load_topology", "resolve_import"]

DATA_ALIASES = {"mnist": "nodes.data:MNIST", "ptb": "nodes.ptb:PennTreebank",
                "copy": "nodes.sequence_tasks:CopyTask"}
_NAME = re.compile(r"\w+(-\w+)*", re.ASCII)  # node and host names: no dots (dotted keys), no "->"
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass(frozen=True)
class EdgeSpec:
    src: str
    dst: str
    mode: str  # backprop | dni | cdni | bp_lambda | delayed: the update rule of `src`
    gather: str = "latest"  # latest | stack: what `dst`, ticking every few seqs, takes
    kind: str = "data"  # data: an input of dst's module | trigger: the source's batch for dst's
                        # synthetic input I(x) (complete unlock); added by `synthetic_input`

    @property
    def name(self) -> str:
        """The edge's name in wire messages (`Activation.edge`), the same in every process."""
        return f"{self.src}->{self.dst}"

    def __str__(self) -> str:
        return f"{self.src} -> {self.dst}"


LAUNCHER = "launcher"
"""The launcher's name: its control inbox's and its key's; no node may take it."""
AUTO = "auto"
"""A host address found at run time: each node on it binds the address its machine reaches the
launcher from (so only a launched node can have it), on a port chosen then unless it names one."""


@dataclass(frozen=True)
class HostSpec:
    name: str
    address: str  # what nodes on this host bind and what their peers connect to, or AUTO
    base_port: int
    ray: dict[str, Any] | None = None  # the Ray placement of its nodes (RayFile's fields)


@dataclass(frozen=True)
class LinkSpec:
    """Emulated link conditions of one edge (for the transport's link shim)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_mbps: float | None = None  # None: unlimited


@dataclass(frozen=True)
class DataSpec:
    source: str  # import path "pkg.mod:Class" (aliases such as "mnist" already expanded)
    args: dict[str, Any]
    batch_size: int
    epochs: int
    eval_every: int  # epochs between evaluations; 0 = only at the end
    data_dir: Path | None  # None: the source decides (env DNI_MESH_DATA, then its default)
    limit: int | None  # training batches per epoch at most


@dataclass(frozen=True)
class NodeSpec:
    name: str
    role: str  # source | stage | head
    module: str | None  # import path of the nn.Module class; None for the source
    args: dict[str, Any]
    optimizer: dict[str, Any]  # for dni_mesh.synthetic.make_optimizer
    synthetic_gradient: dict[str, Any]  # the fields of SyntheticGradientConfig
    device: str
    threads: int
    window: int
    bp_lambda: float
    time: str | None  # None: a feed-forward module; bptt | dni: recurrent, over chunks
    max_restarts: int  # times the launcher restarts the node after it died (`restart.max`)
    tick: int  # the node steps once every `tick` seqs
    objective: str | None  # a head's objective class (import path); None: the labels' default
    objective_args: dict[str, Any]
    host: str
    port: int
    address: str  # tcp://{host address}:{port}, the node's inbox
    mode: str | None  # the mode of its out-edges; None for a head
    ray: dict[str, Any] | None = None  # num_cpus, num_gpus, resources: its own, else its host's
    synthetic_input: dict[str, Any] | None = None  # hidden, width, optimizer; None: no unlock


@dataclass(frozen=True)
class Topology:
    name: str
    mode: str  # the mesh-wide default edge mode
    seed: int
    data: DataSpec
    nodes: dict[str, NodeSpec]  # in file order
    edges: list[EdgeSpec]  # in file order, which is also each node's input order
    hosts: dict[str, HostSpec]
    links: dict[str, LinkSpec]  # by EdgeSpec.name, one for every edge
    transport: dict[str, Any]  # keyword arguments for TransportConfig
    checkpoint: dict[str, Any]  # keyword arguments for dni_mesh.checkpoint.CheckpointPolicy
    curve_keys: Path | None  # `security.curve.keys`: CURVE on every socket; None: off
    path: Path  # the file, absolute
    root: Path  # its folder: import paths resolve against it
    raw: RawTopology | None = field(default=None, repr=False, compare=False)  # for `error`

    def error(self, key: tuple[str | int, ...], message: str) -> TopologyError:
        """A TopologyError at a key of the file (file, line, key: message), for problems found
        after loading, e.g. by the dry run of `dni_mesh.build.resolve_plan`."""
        if self.raw is not None:
            return self.raw.error(key, message)
        return TopologyError(message, file=str(self.path), key=".".join(map(str, key)) or None)

    def inputs(self, node: str) -> list[EdgeSpec]:
        """In-edges in file order: a fan-in module is called as module(*inputs) in this order.
        A trigger edge is no input of the module (`in_edges` has it too)."""
        return [e for e in self.edges if e.dst == node and e.kind == "data"]

    def in_edges(self, node: str) -> list[EdgeSpec]:
        """Every edge into the node: its inputs, then its trigger edge if it has one."""
        return self.inputs(node) + [e for e in self.edges if e.dst == node and e.kind == "trigger"]

    def outputs(self, node: str) -> list[EdgeSpec]:
        return [e for e in self.edges if e.src == node]

    def found_at_run_time(self, node: str) -> bool:
        """Whether the node's address is known only once it binds (port 0, or an AUTO host):
        only a launcher can then tell its peers where it listens."""
        spec = self.nodes[node]
        return spec.port == 0 or self.hosts[spec.host].address == AUTO

    def neighbours(self, node: str) -> set[str]:
        """The nodes at the other end of its edges: all it sends to and all that may send to it."""
        return {e.dst for e in self.outputs(node)} | {e.src for e in self.in_edges(node)}

    @property
    def source(self) -> str:
        return next(n.name for n in self.nodes.values() if n.role == "source")

    @property
    def heads(self) -> list[str]:
        return [n.name for n in self.nodes.values() if n.role == "head"]

    def topological_order(self) -> list[str]:
        """Every node after all of its in-edges' producers; ties keep file order, so the order
        is stable."""
        waiting = {name: len(self.in_edges(name)) for name in self.nodes}
        order = [name for name, count in waiting.items() if count == 0]
        for name in order:  # grows while we walk it
            for edge in self.outputs(name):
                waiting[edge.dst] -= 1
                if waiting[edge.dst] == 0:
                    order.append(edge.dst)
        return order


def load_topology(path: str | Path, overrides: Sequence[str] = (), *,
                  check_imports: bool = True) -> Topology:
    """Read, validate and resolve a topology file; raise TopologyError on the first problem.

    `overrides` are `dotted.key=value` strings applied before validation. `check_imports=False`
    skips importing node modules and the data source, for a process on a host that lacks the
    code of other hosts' nodes (it resolves its own module with `resolve_import`).
    """
    raw = read_topology(path, overrides)
    top = raw.check(TopologyFile, raw.data, ())
    for section, names in (("nodes", top.nodes), ("hosts", top.hosts)):
        for name in names:
            if not _NAME.fullmatch(str(name)):
                raise raw.error((section, name), f"name {name!r} must be letters, digits, _ and -")
    if LAUNCHER in top.nodes:
        raise raw.error(("nodes", LAUNCHER), f"no node may be named {LAUNCHER!r}: the launcher "
                        "goes by that name on the control connection and in the mesh's keys")
    settings = _node_settings(raw, top)
    edges = _edges(raw, top)
    _check_graph(raw, settings, edges)
    modes = _out_modes(raw, settings, edges)
    hosts = {name: HostSpec(name, h.address, h.base_port, h.ray and h.ray.model_dump())
             for name, h in top.hosts.items()}
    places = _places(raw, settings, hosts)
    nodes = {name: _node_spec(raw, name, node, modes[name], hosts[places[name][0]], places[name][1])
             for name, node in settings.items()}
    _check_clocks(raw, nodes, edges, top.checkpoint.every)
    edges += _trigger_edges(raw, nodes, edges)
    file_path = Path(path).resolve()
    topology = Topology(
        name=top.name or file_path.stem, mode=top.mode, seed=top.seed,
        data=_data_spec(top.data, file_path.parent), nodes=nodes, edges=edges, hosts=hosts,
        links=_links(raw, top.links, edges), transport=_transport(raw, top.transport),
        checkpoint=top.checkpoint.model_dump(),
        curve_keys=(file_path.parent / Path(top.security.curve.keys).expanduser()
                    if top.security.curve is not None else None),
        path=file_path, root=file_path.parent, raw=raw)
    if check_imports:
        _check_imports(raw, topology)
    return topology


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _deep_merge(merged[key], value) if both else value
    return merged


def _node_settings(raw: RawTopology, top: TopologyFile) -> dict[str, NodeFile]:
    """Built-in defaults <- `defaults` <- the node's own keys (deep merge, the node wins).

    `defaults` is checked on its own first, so a bad default is reported at `defaults.*` and
    a problem found in a node's merged settings is always in that node's own keys.
    """
    defaults = _deep_merge(SettingsFile().model_dump(), top.defaults)
    raw.check(SettingsFile, defaults, ("defaults",))
    nodes = {}
    for name, own in top.nodes.items():
        node = raw.check(NodeFile, _deep_merge(defaults, own), ("nodes", name))
        if node.role == "source":
            for key in ("module", "args"):
                if key in own:
                    raise raw.error(("nodes", name, key), "the source has no module or args; it "
                                    "reads the `data` section (put source arguments in data.args)")
        elif node.module is None:
            raise raw.error(("nodes", name, "module"), "required key missing (every stage and "
                            "head names its module; the data source says role: source)")
        nodes[name] = node.model_copy(update={"role": node.role or "stage"})
    return nodes


def _edge_name(text: str) -> tuple[str, str] | None:
    parts = [p.strip() for p in text.split("->")]
    return (parts[0], parts[1]) if len(parts) == 2 and all(parts) else None


def _edges(raw: RawTopology, top: TopologyFile) -> list[EdgeSpec]:
    edges: list[EdgeSpec] = []
    for i, item in enumerate(top.edges):
        key = ("edges", i)
        if isinstance(item, dict):
            edge = raw.check(EdgeFile, item, key)
            src, dst, mode, gather = edge.src, edge.dst, edge.mode or top.mode, edge.gather
        elif isinstance(item, str) and (ends := _edge_name(item)):
            (src, dst), mode, gather = ends, top.mode, "latest"
        else:
            raise raw.error(key, f"expected 'a -> b' or {{from: a, to: b}}, got {item!r}")
        for name in (src, dst):
            if name not in top.nodes:
                problem = unknown(name, list(top.nodes), "node")
                raise raw.error(key, f"edge '{src} -> {dst}': {problem}")
        spec = EdgeSpec(src, dst, mode, gather)
        first = next((j for j, e in enumerate(edges) if (e.src, e.dst) == (src, dst)), None)
        if first is not None:
            raise raw.error(key, f"duplicate edge {spec} (first at edges.{first})")
        edges.append(spec)
    return edges


def _check_graph(raw: RawTopology, nodes: dict[str, NodeFile], edges: list[EdgeSpec]) -> None:
    """The shape every mesh must have: one source feeding a DAG that ends in heads."""
    sources = [name for name, node in nodes.items() if node.role == "source"]
    if not sources:
        raise raw.error(("nodes",), "no node has role: source (exactly one is needed)")
    if len(sources) > 1:
        raise raw.error(("nodes", sources[1], "role"), f"a second source ({sources[0]!r} is one); "
                        "exactly one is allowed")
    if not any(node.role == "head" for node in nodes.values()):
        raise raw.error(("nodes",), "no node has role: head (at least one is needed)")
    for i, edge in enumerate(edges):
        if edge.dst == sources[0]:
            raise raw.error(("edges", i), f"{edge}: the source {edge.dst!r} takes no inputs")
        if nodes[edge.src].role == "head":
            raise raw.error(("edges", i), f"{edge}: a head ({edge.src!r}) has no outputs")
    for name, node in nodes.items():
        if node.role != "head" and not any(e.src == name for e in edges):
            raise raw.error(("nodes", name), f"{node.role} {name!r} has no out-edge (its output "
                            "would go nowhere; a node that owns the loss needs role: head)")
    cycle = _find_cycle(list(nodes), edges)
    if cycle:
        closing = next(i for i, e in enumerate(edges) if (e.src, e.dst) == tuple(cycle[-2:]))
        raise raw.error(("edges", closing), f"the edges form a cycle: {' -> '.join(cycle)}")
    reached, frontier = {sources[0]}, [sources[0]]
    while frontier:
        here = frontier.pop()
        for edge in edges:
            if edge.src == here and edge.dst not in reached:
                reached.add(edge.dst)
                frontier.append(edge.dst)
    lost = [name for name in nodes if name not in reached]
    if lost:
        raise raw.error(("nodes", lost[0]), f"not reachable from the source {sources[0]!r} "
                        f"(unreachable: {', '.join(lost)})")


def _find_cycle(names: list[str], edges: list[EdgeSpec]) -> list[str] | None:
    """A cycle as its node names, first repeated last (e.g. [a, b, a]), or None (a DAG)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        path.append(name)
        for edge in edges:
            if edge.src != name:
                continue
            if edge.dst in path:
                return path[path.index(edge.dst):] + [edge.dst]
            if edge.dst not in done and (found := visit(edge.dst)):
                return found
        done.add(path.pop())
        return None

    return next((c for name in names if name not in done and (c := visit(name))), None)


def _out_modes(raw: RawTopology, nodes: dict[str, NodeFile],
               edges: list[EdgeSpec]) -> dict[str, str | None]:
    """Each node's one update rule: the mode its out-edges share (None for a head)."""
    modes: dict[str, str | None] = {name: None for name in nodes}
    for i, edge in enumerate(edges):
        mode = modes[edge.src]
        if mode is not None and mode != edge.mode:
            first = next(e for e in edges if e.src == edge.src)
            raise raw.error(("edges", i), f"node {edge.src!r} has out-edges with different modes "
                            f"({first}: {mode}, {edge}: {edge.mode}); a node runs one update "
                            "rule, so its out-edges must share a mode")
        modes[edge.src] = edge.mode
    return modes


def _places(raw: RawTopology, nodes: dict[str, NodeFile],
            hosts: dict[str, HostSpec]) -> dict[str, tuple[str, int]]:
    """(host, port) of every node. Explicit ports are claimed first; the others take base_port,
    base_port + 1, ... of their host in file order, skipping ports already claimed there. Port 0
    (a node's, or every node's of a host with base_port 0) is claimed by no one: each such node
    binds a free port at run time and the launcher tells its peers (`wire.Bound`, `wire.Peers`).
    So do the nodes of a host whose address is AUTO, unless they name a port: an AUTO host may
    stand for several machines, so its named ports are told apart by node, not by address."""
    if not hosts:
        raise raw.error(("hosts",), "at least one host is needed")
    default = next(iter(hosts)) if len(hosts) == 1 else "local" if "local" in hosts else None
    host_of = {}
    for name, node in nodes.items():
        host = node.host or default
        if host is None:
            raise raw.error(("nodes", name, "host"), f"required key missing (hosts "
                            f"{', '.join(hosts)} are defined and none is named 'local')")
        if host not in hosts:
            raise raw.error(("nodes", name, "host"), unknown(host, list(hosts), "host"))
        host_of[name] = host
    claimed: dict[tuple[str, int], str] = {}  # (address, port) -> node
    next_port = {name: host.base_port for name, host in hosts.items()}
    places = {}
    for name in sorted(nodes, key=lambda n: nodes[n].port is None):  # explicit ports first
        host = hosts[host_of[name]]
        port = nodes[name].port
        if port is None and (host.base_port == 0 or host.address == AUTO):
            port = 0
        if port == 0:
            places[name] = (host.name, port)
            continue
        if port is None:
            port = next_port[host.name]
            while (host.address, port) in claimed:
                port += 1
            if port > 65535:
                raise raw.error(("hosts", host.name, "base_port"), f"no port left for {name!r}")
            next_port[host.name] = port + 1
        elif (host.address, port) in claimed and host.address != AUTO:
            raise raw.error(("nodes", name, "port"), f"port {port} on {host.address} (host "
                            f"{host.name!r}) is taken by both {claimed[host.address, port]!r} "
                            f"and {name!r}")
        claimed[host.address, port] = name
        places[name] = (host.name, port)
    return places


def _node_spec(raw: RawTopology, name: str, node: NodeFile, mode: str | None, host: HostSpec,
               port: int) -> NodeSpec:
    """The resolved node. For dni and cdni the mode decides `conditioned` (the stage refuses a
    synthesizer that disagrees), so a stage's contradicting explicit value is an error here."""
    sg = node.synthetic_gradient.model_dump()
    if mode in ("dni", "cdni"):
        if node.role == "stage" and sg["conditioned"] not in (None, mode == "cdni"):
            own = "conditioned" in raw.data["nodes"][name].get("synthetic_gradient", {})
            key = ("nodes", name) if own else ("defaults",)
            raise raw.error(key + ("synthetic_gradient", "conditioned"),
                            f"{sg['conditioned']} contradicts mode {mode!r} of node {name!r} "
                            "(cdni is the conditioned mode); leave the key out")
        sg["conditioned"] = mode == "cdni"
    sg["conditioned"] = bool(sg["conditioned"])
    return NodeSpec(
        name=name, role=node.role, module=node.module, args=node.args,
        optimizer=node.optimizer.model_dump(), synthetic_gradient=sg, device=node.device,
        threads=node.threads, window=node.window, bp_lambda=node.bp_lambda, time=node.time,
        max_restarts=node.restart.max, tick=node.tick, objective=node.objective,
        objective_args=node.objective_args, host=host.name, port=port,
        address=f"tcp://{host.address}:{port}", mode=mode,
        ray=node.ray.model_dump() if node.ray is not None else host.ray,
        synthetic_input=node.synthetic_input and node.synthetic_input.model_dump())


def _trigger_edges(raw: RawTopology, nodes: dict[str, NodeSpec],
                   edges: list[EdgeSpec]) -> list[EdgeSpec]:
    """An edge from the source to every node with a synthetic input (complete unlock): the
    node steps on I(x) as soon as the source's batch x is there. What the paper unlocks this
    way is a stage of a chain that learns from synthetic gradients; anything else is refused."""
    source = next(name for name, node in nodes.items() if node.role == "source")
    triggers = []
    for name, node in nodes.items():
        if node.synthetic_input is None:
            continue
        key = ("nodes", name, "synthetic_input")
        inputs = [e for e in edges if e.dst == name]
        problem = (
            f"only a stage takes a synthetic input, not a {node.role}" if node.role != "stage" else
            f"a synthetic input stands for one input; it has {len(inputs)} in-edges"
            if len(inputs) != 1 else
            f"its input comes from the source {source!r} already: nothing to unlock"
            if inputs[0].src == source else
            f"a synthetic input needs mode dni or cdni (its out-edges), not {node.mode}"
            if node.mode not in ("dni", "cdni") else
            f"a recurrent node (time: {node.time}) takes no synthetic input" if node.time else
            None)
        if problem is not None:
            raise raw.error(key, f"node {name}: {problem}")
        source_mode = next(e.mode for e in edges if e.src == source)
        triggers.append(EdgeSpec(source, name, source_mode, kind="trigger"))
        # A restarted producer resumes past the seqs it lost, and its consumer learns where only
        # from its next activation; with a trigger edge the source waits for that consumer's
        # answers to exactly those seqs, so the two would wait for each other.
        for producer in (e.src for e in inputs if nodes[e.src].max_restarts):
            raise raw.error(("nodes", producer, "restart", "max"), (
                f"node {producer} may not restart: its consumer {name} has a synthetic input, and "
                "a rejoin that skips seqs would stall them both (not supported yet)"))
    return triggers


def _check_clocks(raw: RawTopology, nodes: dict[str, NodeSpec], edges: list[EdgeSpec],
                  every: int) -> None:
    """A node that ticks every k seqs is a head; a "stack" edge feeds such a node from an
    unlocked producer whose window holds a group; checkpoints fall on group boundaries."""
    for name, node in nodes.items():
        if node.objective is not None and node.role != "head":
            raise raw.error(("nodes", name, "objective"), f"node {name}: only a head has an objective")
        if node.tick > 1 and node.role != "head":
            raise raw.error(("nodes", name, "tick"), f"node {name}: only a head may tick every "
                            f"{node.tick} seqs (a node that ticks slower cannot feed another yet)")
        if node.tick > 1 and every % node.tick:
            raise raw.error(("checkpoint", "every"), f"{every} is not a multiple of node {name}'s "
                            f"tick {node.tick}: every node must save at the same seqs")
        # A rejoin resumes and skips seqs one by one, which would cut a ticking node's groups.
        restarting = [name, *(e.src for e in edges if e.dst == name)] if node.tick > 1 else []
        for other in restarting:
            if nodes[other].max_restarts:
                raise raw.error(("nodes", other, "restart", "max"), (
                    f"node {other} may not restart: node {name} ticks every {node.tick} seqs, "
                    "and a restart of it or of a node feeding it would split its groups "
                    "(not supported yet)"))
    for i, edge in enumerate(edges):
        tick, producer = nodes[edge.dst].tick, nodes[edge.src]
        if edge.gather == "stack" and tick == 1:
            raise raw.error(("edges", i, "gather"), f"edge {edge}: stack takes a group of seqs, "
                            f"but {edge.dst} ticks every seq (set nodes.{edge.dst}.tick)")
        if edge.gather == "stack" and (edge.mode in ("backprop", "bp_lambda") or producer.window < tick):
            raise raw.error(("edges", i, "gather"), (
                f"edge {edge}: {edge.src} must keep a group of {tick} outputs in flight for a stack: "
                f"an unlocked mode (not {edge.mode}) and a window of at least {tick} "
                f"(it has {producer.window})"))


def _data_spec(data: DataFile, root: Path) -> DataSpec:
    """A relative data_dir is relative to the topology's folder, like its import paths."""
    data_dir = None if data.data_dir is None else root / Path(data.data_dir).expanduser()
    return DataSpec(source=DATA_ALIASES.get(data.source, data.source), args=data.args,
                    batch_size=data.batch_size, epochs=data.epochs, eval_every=data.eval_every,
                    data_dir=data_dir, limit=data.limit)


def _links(raw: RawTopology, links: dict[str, dict[str, Any]],
           edges: list[EdgeSpec]) -> dict[str, LinkSpec]:
    """`links.default` for every edge, field by field overridden by `links["a -> b"]`."""
    default = raw.check(LinkFile, links.get("default", {}), ("links", "default")).model_dump()
    by_edge = {(e.src, e.dst): e.name for e in edges}
    resolved = {e.name: LinkSpec(**default) for e in edges}
    for key, own in links.items():
        if key == "default":
            continue
        ends = _edge_name(key)
        if ends not in by_edge:
            raise raw.error(("links", key), f"no such edge (edges: {', '.join(map(str, edges))})")
        resolved[by_edge[ends]] = LinkSpec(
            **raw.check(LinkFile, {**default, **own}, ("links", key)).model_dump())
    return resolved


def _transport(raw: RawTopology, transport: dict[str, Any]) -> dict[str, Any]:
    """Check keys against TransportConfig and let its constructor judge the values. Imported
    only when there is something to check (it pulls in zmq and torch), and skipped while the
    transport module does not exist yet."""
    if not transport:
        return {}
    try:
        from dni_mesh.transport import TransportConfig
    except ModuleNotFoundError as exc:
        if exc.name != "dni_mesh.transport":
            raise
        return dict(transport)

    known = [f.name for f in fields(TransportConfig)]
    for key in transport:
        if key not in known:
            raise raw.error(("transport", key), unknown(key, known))
    try:
        TransportConfig(**transport)
    except (TypeError, ValueError) as exc:
        raise raw.error(("transport",), f"rejected by TransportConfig: {exc}") from None
    return dict(transport)


def _check_imports(raw: RawTopology, topology: Topology) -> None:
    """Import every module the mesh names, so a bad path fails now and not in a node process."""
    named = [(("nodes", n.name, key), path) for n in topology.nodes.values()
             for key, path in (("module", n.module), ("objective", n.objective)) if path]
    for key, spec in [*named, (("data", "source"), topology.data.source)]:
        try:
            resolve_import(spec, topology.root)
        except TopologyError as exc:
            raise raw.error(key, exc.message) from exc.__cause__


@contextmanager
def _front_of_sys_path(folder: Path) -> Iterator[None]:
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)  # the first occurrence: the one we inserted


def resolve_import(spec: str, root: Path) -> object:
    """The callable named by "pkg.mod:Attr" (Attr may be dotted), importing with `root` (the
    topology's folder) at the front of sys.path, so a user keeps node modules next to the file.

    Only the import itself sees `root`; modules already imported (sys.modules) win, so a local
    module must not share a name with an installed one.
    """
    if not _IMPORT_PATH.fullmatch(spec):
        raise TopologyError(f"{spec!r} is not an import path like 'package.module:Class'")
    module_name, _, attr = spec.partition(":")
    with _front_of_sys_path(root):
        importlib.invalidate_caches()  # files written since the last import (tests, notebooks)
        try:
            target: object = importlib.import_module(module_name)
        except ImportError as exc:
            raise TopologyError(f"cannot import {module_name!r}: {exc}") from exc
        except Exception as exc:  # the module's own code failed while importing
            raise TopologyError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") \
                from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise TopologyError(f"module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise TopologyError(f"{spec!r} is a {type(target).__name__}, not callable")
    return target


def describe(topology: Topology, outputs: dict[str, str] | None = None) -> str:
    """The resolved mesh as text, for `dni-mesh validate`: what will run where. `outputs`, when
    given, is what each node sends (e.g. "float32[256]"), shown as a last column."""
    t, d = topology, topology.data
    lines = [f"topology {t.name!r} from {t.path}: mode {t.mode}, seed {t.seed}",
             f"data: {d.source}({_kwargs(d.args)}), batch_size {d.batch_size}, epochs {d.epochs}, "
             f"eval_every {d.eval_every}, limit {d.limit}, data_dir {d.data_dir or 'default'}",
             "nodes (in topological order):"]
    rows = [[name, n.role, f"{n.module}({_kwargs(n.args)})" if n.module else "-",
             f"{n.host} {n.address}", n.device, f"mode {n.mode}" if n.mode else "loss",
             " ".join(([f"time {n.time}"] if n.time and n.module else []) + ([f"tick {n.tick}"] if n.tick > 1 else [])
                      + (["synthetic input"] if n.synthetic_input else []))]
            + ([f"-> {outputs[name]}" if name in outputs else ""] if outputs else [])
            for name in t.topological_order() for n in [t.nodes[name]]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.append("edges:")
    width = max(len(str(edge)) for edge in t.edges)
    for edge in t.edges:
        link = t.links[edge.name]
        shaped = "" if link == LinkSpec() else (
            f"  link: delay {link.delay_ms:g} ms, jitter {link.jitter_ms:g} ms, bandwidth "
            + ("unlimited" if link.bandwidth_mbps is None else f"{link.bandwidth_mbps:g} Mbit/s"))
        gather = f"  gather {edge.gather}" if t.nodes[edge.dst].tick > 1 else ""
        mode = "trigger (synthetic input)" if edge.kind == "trigger" else edge.mode
        lines.append(f"  {str(edge).ljust(width)}  {mode}{gather}{shaped}")
    return "\n".join(lines)


def _kwargs(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())
