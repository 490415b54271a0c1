"""`dni-mesh`: run a mesh, check a topology file, run one node of a mesh spread over machines,
benchmark a mesh, plot finished runs, or make a mesh's CURVE keys.

Exit codes: 0 success, 1 a node or the run failed, 2 an invalid topology or command line,
130 interrupted (SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dni_mesh.plot import MissingExtra
from dni_mesh.plot import add_arguments as _plot_arguments
from dni_mesh.topology import TopologyError, describe, load_topology


def _topology_args(parser: argparse.ArgumentParser, optional: str | None = None) -> None:
    """TOPOLOGY and --set; `optional`: the help of a TOPOLOGY that may be left out."""
    parser.add_argument("topology", nargs="?" if optional else None,
                        help=optional or "topology YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a dotted key, e.g. data.epochs=1")


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _given(**options: object) -> dict:
    """The options the command line set; the others keep the called function's defaults."""
    return {key: value for key, value in options.items() if value is not None}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dni-mesh", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start every node on this machine and supervise them")
    _topology_args(run, optional="topology YAML file (not with --resume)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue the run in RUN_DIR from its newest checkpoint common to "
                          "every node, with its topology and overrides (plus --set ones that "
                          "keep the shapes)")
    run.add_argument("--summary", type=Path, help="write the run summary as JSON here")
    run.add_argument("--run-dir", type=Path, help="folder for logs and metrics (default runs/NAME-TIME-PID)")
    run.add_argument("--no-live", action="store_true", help="no live table, even on a terminal")
    run.add_argument("--tensorboard", action="store_true",
                     help="also write TensorBoard event files into RUN_DIR/tensorboard "
                          "(needs the tensorboard extra)")
    run.add_argument("--stall-timeout", type=_seconds, metavar="SECONDS",
                     help="fail the run when no node has advanced for this long (default 30)")
    run.add_argument("--hosts", choices=["local", "netns"], default="local",
                     help="local: every node on this machine's network; netns: each host of the "
                          "topology in its own network namespace at its address (needs root)")
    run.add_argument("--start", choices=["fork", "exec"], default="fork",
                     help="fork: nodes fork from one process that imported torch once (fast "
                          "start-up); exec: a fresh interpreter per node (always so with netns)")
    run.add_argument("--launcher", choices=["local", "ray"], default="local",
                     help="local: node processes on this machine; ray: each node a process on a "
                          "Ray cluster, placed by the topology's `ray` keys (needs the ray extra)")
    run.add_argument("--address", metavar="ADDRESS",
                     help="with --launcher ray: the Ray cluster's address, or auto (default: a "
                          "private Ray instance on this machine, bound to 127.0.0.1)")
    run.add_argument("--control-host", metavar="IP",
                     help="the address of this machine the launcher's control inbox binds; "
                          "every node must reach it (default 127.0.0.1)")

    plot = sub.add_parser("plot", help="draw loss, test accuracy, synthesizer loss and samples/s "
                          "per node of one or more runs, side by side, into a PNG")
    _plot_arguments(plot)

    validate = sub.add_parser("validate", help="check a topology file and print the resolved mesh")
    _topology_args(validate)

    bench = sub.add_parser("bench", help="measure the mesh per mode and link delay beside a "
                           "single-process reference and torch's GPipe pipeline")
    _topology_args(bench)
    bench.add_argument("--modes", default="backprop,dni,cdni",
                       help="comma-separated modes, and complete_unlock (cdni with synthetic inputs)")
    bench.add_argument("--delays", default="0,2ms,10ms,50ms",
                       help="comma-separated link delays per message (ms, or with an s suffix)")
    bench.add_argument("--target", type=float, default=0.9, help="test accuracy to time")
    bench.add_argument("--microbatches", type=int, default=4, help="GPipe microbatches per batch")
    bench.add_argument("--repeat", type=int, default=1,
                       help="run the whole grid this many times; the table shows medians")
    bench.add_argument("--json", type=Path, help="write the report as JSON here")
    bench.add_argument("--plot", type=Path, help="write the plots here (PNG; needs matplotlib)")
    bench.add_argument("--run-dir", type=Path, help="folder for every run (default runs/bench-TIME)")

    node = sub.add_parser("node", help="run one node (one per machine or process)")
    _topology_args(node)
    node.add_argument("--name", required=True, help="the node to run")
    node.add_argument("--control", help="launcher control address (set by `dni-mesh run`)")
    node.add_argument("--run-dir", type=Path, default=Path("runs/node"),
                      help="folder for this node's metrics (default runs/node)")
    node.add_argument("--stall-timeout", type=_seconds, metavar="SECONDS",
                      help="without --control: exit with an error after this long without "
                           "progress, naming what the node waits for (default 60)")
    node.add_argument("--kernel-bandwidth", action="store_true",
                      help="the network shapes bandwidth between hosts (set by --hosts netns)")
    node.add_argument("--plan", type=Path, help="the mesh's plan (set by `dni-mesh run`); "
                      "without it the node dry-runs every module to find the shapes")
    restart = node.add_mutually_exclusive_group()
    restart.add_argument("--resume", type=int, metavar="SEQ",
                         help="start from this node's checkpoint in --run-dir saved before seq "
                              "SEQ (every node of the mesh resumes at the same SEQ)")
    restart.add_argument("--rejoin", action="store_true",
                         help="this node died while its mesh runs on: start from its newest "
                              "checkpoint in --run-dir (or from scratch) and rejoin its neighbours")

    keys = sub.add_parser("keys", help="make a CURVE key pair for every node of a mesh and one for "
                          "the launcher (NAME.key public, NAME.key_secret mode 0600)")
    keys.add_argument("folder", type=Path, help="the key folder; refused if any of the files exists")
    names = keys.add_mutually_exclusive_group(required=True)
    names.add_argument("topology", nargs="?", help="topology YAML file: a key pair per node")
    names.add_argument("--nodes", type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
                       metavar="A,B,C", help="the node names, comma-separated")
    return p


def _keys(args: argparse.Namespace) -> int:
    """`dni-mesh keys`: the files it wrote, and where each belongs. No key is ever printed."""
    from dni_mesh.security import LAUNCHER, SecurityError, create_keys
    try:
        nodes = args.nodes if args.topology is None else list(load_topology(args.topology).nodes)
        if not nodes:
            raise SecurityError("no node names given")
        if LAUNCHER in nodes:
            raise SecurityError(f"a node may not be named {LAUNCHER!r}: that is the launcher's key")
        names = create_keys(args.folder, [*nodes, LAUNCHER])
    except (TopologyError, SecurityError) as error:
        print(f"dni-mesh: keys: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(names)} key pairs to {args.folder}: {', '.join(names)}\n"
          f"  NAME.key (public): copy every one to every host of the mesh\n"
          f"  NAME.key_secret (mode 0600): only to the host that runs NAME; the launcher's to the "
          f"host of `dni-mesh run`")
    return 0


def _launcher_conflict(args: argparse.Namespace) -> str | None:
    """What is wrong with `run`'s choice of launcher and addresses, if anything: each network
    namespace has its own control address, and --address only means something to Ray."""
    if args.address is not None and args.launcher != "ray":
        return "--address goes with --launcher ray"
    if args.hosts == "netns" and (args.launcher == "ray" or args.control_host is not None):
        return "--hosts netns starts its own nodes and control address: not with --launcher ray " \
               "or --control-host"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "plot":
        from dni_mesh.plot import plot_main
        return plot_main(args)
    if args.command == "keys":
        return _keys(args)
    resuming = args.command == "run" and args.resume is not None
    if args.command == "run" and (resuming == (args.topology is not None) or
                                  (resuming and args.run_dir is not None)):
        print("dni-mesh: run takes a TOPOLOGY file, or --resume RUN_DIR without a topology "
              "and without --run-dir", file=sys.stderr)
        return 2
    try:
        topology = None if resuming else load_topology(args.topology, args.overrides)
    except TopologyError as error:
        print(f"dni-mesh: invalid topology: {error}", file=sys.stderr)
        return 2
    if args.command == "validate":
        from dni_mesh.build import nodes_here, resolve_plan
        here = nodes_here(topology)
        try:
            plan = resolve_plan(topology, devices=here)
        except TopologyError as error:
            print(f"dni-mesh: invalid topology: {error}", file=sys.stderr)
            return 2
        print(describe(topology, {name: plan.describe(name) for name in topology.nodes}))
        elsewhere = [name for name in topology.nodes if name not in here]
        if elsewhere:
            print(f"devices not checked (their hosts are other machines): {', '.join(elsewhere)}")
        return 0
    if args.command == "node":
        if args.name not in topology.nodes:
            print(f"dni-mesh: {topology.path}: no node named {args.name!r} "
                  f"(nodes: {', '.join(topology.nodes)})", file=sys.stderr)
            return 2
        from dni_mesh.node import run_node
        return run_node(topology, args.name, args.control, args.run_dir, args.kernel_bandwidth,
                        **_given(stall_s=args.stall_timeout, plan_path=args.plan,
                                 resume_at=args.resume), rejoin=args.rejoin,
                        curve_keys=topology.curve_keys)
    forkserver = None
    if args.command == "run" and (conflict := _launcher_conflict(args)):
        print(f"dni-mesh: run: {conflict}", file=sys.stderr)
        return 2
    if args.command == "run" and args.start == "fork" and args.hosts == "local" and \
            args.launcher == "local":
        from dni_mesh.forkserver import ForkServer, node_environment
        forkserver = ForkServer(node_environment())  # before our imports of torch: they overlap
    from dni_mesh.launch import (CannotResume, Interrupted, NodeFailed, NodeStart, PortInUse,
                                 resume_point, resumed_topology, run)
    from dni_mesh.netns import NetnsError, Network
    from dni_mesh.security import SecurityError
    try:
        if args.command == "bench":
            from dni_mesh.bench import bench_main
            return bench_main(args)
        overrides, run_dir, resume_at = args.overrides, args.run_dir, None
        if resuming:
            run_dir = args.resume
            topology, overrides = resumed_topology(run_dir, args.overrides)
            resume_at = resume_point(run_dir, topology)
        options = dict(run_dir=run_dir, summary_path=args.summary, live=not args.no_live,
                       topology=topology, tensorboard=args.tensorboard,
                       start=NodeStart(args.start), forkserver=forkserver, resume_at=resume_at,
                       **_given(stall_s=args.stall_timeout, control_host=args.control_host))
        if args.launcher == "ray":
            from dni_mesh.ray_launcher import run_on_ray
            run_on_ray(topology.path, overrides, address=args.address, **options)
        elif args.hosts == "netns":
            with Network(topology) as network:
                run(topology.path, overrides, wrap=network.wrap,
                    control_host=network.control_host, **options)
        else:
            run(topology.path, overrides, **options)
    except (TopologyError, NetnsError, PortInUse, MissingExtra, NodeFailed, CannotResume,
            SecurityError) as error:
        failures = ((TopologyError, "invalid topology: ", 2), (NetnsError, "--hosts netns: ", 2),
                    (PortInUse, "", 2), (MissingExtra, "", 1), (NodeFailed, "run failed: ", 1),
                    (CannotResume, "cannot resume: ", 2), (SecurityError, "CURVE: ", 2))
        prefix, code = next((p, c) for kind, p, c in failures if isinstance(error, kind))
        print(f"dni-mesh: {prefix}{error}", file=sys.stderr)
        return code
    except (Interrupted, KeyboardInterrupt) as error:
        print(f"dni-mesh: interrupted ({error or 'signal'}); every node was stopped",
              file=sys.stderr)
        return 130
    finally:
        if forkserver is not None:
            forkserver.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
