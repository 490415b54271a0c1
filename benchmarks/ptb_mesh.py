"""The stacked Penn Treebank network as a mesh of processes against the same network in one
process: test bits per character and training characters per second.

    python -m benchmarks.ptb_mesh [--quick] [--set dotted.key=value ...] [--json PATH]
                                  [--only CONFIGURATION ...] [--repeat N]

Issue 12: `examples/ptb_char_dni.yaml` (source -> l1 LSTM -> head LSTM + softmax, chunks of T
characters) runs as it is and as its truncated-BPTT baseline (locked, no DNI in time). Each
configuration runs twice, back to back, with the same overrides: as real processes over
ZeroMQ (`dni_mesh.run`, every node forked from one fork server that serves all mesh runs), and
in one process on one thread (`train_in_process`: the very same node cores on one in-process
bus). Whether splitting a network over processes costs accuracy or buys speed is what this
measures. At window 1 the cores see their events in the same order in both, so the bits per
character should agree up to float noise; an unlocked edge with a window above 1 lets the
mesh's steps overlap, which may change them: how far layer 1 runs ahead then depends on the
processes' timing, so two mesh runs of one configuration differ. --repeat N runs the mesh N
times per configuration (the one-process run is deterministic: once) and compares their mean.

Rate: the head's last training step record (`samples_per_s`, its own clock, evaluation passes
left out; a sample is one row of a chunk) times T, in characters per second, in both systems.
Wall: the mesh's from `run()` (start-up included: `first_step_s`; the first mesh run also waits
for the fork server's imports), one process's around `train_in_process`.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import dni_mesh
from dni_mesh.bench import machine
from dni_mesh.forkserver import ForkServer, node_environment
from dni_mesh.reference import train_in_process
from dni_mesh.topology import Topology, load_topology

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ptb_char_dni.yaml"
# The baseline is the file's own: locked edges, no synthesizer in time.
CONFIGURATIONS = {"as in the file": [], "BPTT baseline": ["mode=backprop", "defaults.time=bptt"]}
# data.args.limit cuts the test split too: 32 rows x 8 characters per chunk, plus one target.
QUICK = ["data.epochs=1", "data.limit=200", "data.args.limit=51201"]  # 200 chunks, 200 to test
FULL = ["data.epochs=1", "data.args.limit=384001"]  # the file's 1,500 chunks once, 1,500 to test


def measured(head_records: list[dict], topology: Topology, wall_s: float) -> dict:
    """Bits per character after each evaluation, the training rate and the wall time."""
    steps = [r for r in head_records if r.get("event") == "step"]
    bits = [round(r["test_bits_per_token"], 4) for r in head_records if r.get("event") == "eval"]
    return {"test_bpc": bits[-1], "test_bpc_per_eval": bits, "chunks": len(steps),
            "chars_per_s": round(steps[-1]["samples_per_s"] * topology.data.args["chunk"], 1),
            "wall_s": round(wall_s, 1)}


def mesh(overrides: list[str], forkserver: ForkServer) -> dict:
    """One run as real processes; read from the head's jsonl records."""
    topology = load_topology(EXAMPLE, overrides)
    with tempfile.TemporaryDirectory() as folder:
        summary = dni_mesh.run(EXAMPLE, overrides, quiet=True, run_dir=Path(folder),
                               forkserver=forkserver)
        head = Path(folder) / f"{topology.heads[0]}.jsonl"
        records = [json.loads(line) for line in head.read_text().splitlines()]
    result = measured(records, topology, summary["wall_s"])
    return {**result, "first_step_s": summary["first_step_s"]}


def one_process(overrides: list[str]) -> dict:
    """The same run on one in-process bus, this process's one thread."""
    topology = load_topology(EXAMPLE, overrides)
    started = time.monotonic()
    bus = train_in_process(topology)
    wall_s = time.monotonic() - started
    head = topology.heads[0]
    return measured([r.values for node, r in bus.records if node == head], topology, wall_s)


def describe(topology: Topology) -> dict:
    """What the file says at run time (another engineer may change its modes)."""
    return {"mode": topology.mode,
            "edges": [f"{e.src} -> {e.dst}: {e.mode}" for e in topology.edges],
            "nodes": {n: {"time": s.time, "window": s.window} for n, s in topology.nodes.items()}}


def table(results: dict) -> str:
    lines = ["| configuration | test BPC mesh / one process | mesh - one process | chars/s mesh / "
             "one process | mesh / one process | wall s mesh / one process |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        mesh, one = r["mesh"], r["one process"]
        runs = r["mesh_test_bpc_runs"]
        shown = (f"{r['mesh_test_bpc_mean']:.4f} (mean of {', '.join(f'{b:.4f}' for b in runs)})"
                 if len(runs) > 1 else f"{mesh['test_bpc']:.4f}")
        lines.append(f"| {name} | {shown} / {one['test_bpc']:.4f} | "
                     f"{r['bpc_mesh_minus_one_process']:+.4f} | {mesh['chars_per_s']:,.0f} / "
                     f"{one['chars_per_s']:,.0f} | x{r['mesh_over_one_process_rate']:.2f} | "
                     f"{mesh['wall_s']:.0f} / {one['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 chunks, 200 to test")
    parser.add_argument("--set", action="append", default=[], help="extra dotted.key=value")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ptb_mesh.json"))
    parser.add_argument("--only", action="append", choices=list(CONFIGURATIONS),
                        help="run this configuration only (repeatable); default: all")
    parser.add_argument("--repeat", type=int, default=1,
                        help="mesh runs per configuration (their timing, so their numbers, differ "
                             "above window 1); the mean is compared")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    chosen = {name: CONFIGURATIONS[name] for name in args.only or CONFIGURATIONS}
    torch.set_num_threads(1)
    budget = [*(QUICK if args.quick else FULL), "checkpoint.every=0", *args.set]
    started, results = time.monotonic(), {}
    forkserver = ForkServer(node_environment())
    try:
        for name, extra in chosen.items():
            overrides = budget + extra
            runs = [mesh(overrides, forkserver) for _ in range(args.repeat)]
            result = {"topology": describe(load_topology(EXAMPLE, overrides)),
                      "mesh": runs[0], "one process": one_process(overrides)}
            if args.repeat > 1:
                result["mesh_repeats"] = runs[1:]
            result["mesh_test_bpc_runs"] = [r["test_bpc"] for r in runs]
            result["mesh_test_bpc_mean"] = round(sum(r["test_bpc"] for r in runs) / len(runs), 4)
            result["bpc_mesh_minus_one_process"] = round(
                result["mesh_test_bpc_mean"] - result["one process"]["test_bpc"], 4)
            result["mesh_over_one_process_rate"] = round(
                result["mesh"]["chars_per_s"] / result["one process"]["chars_per_s"], 2)
            results[name] = result
            print(name, json.dumps({k: v for k, v in result.items() if k != "topology"}),
                  flush=True)
    finally:
        forkserver.close()
    print(table(results))
    report = {"example": str(EXAMPLE.relative_to(EXAMPLE.parents[1])), "overrides": budget,
              "configurations": chosen, "mesh_runs_per_configuration": args.repeat,
              "machine": machine(),
              "load_average_at_end": os.getloadavg(), "wall_s": round(time.monotonic() - started),
              "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
