"""Two networks at two clock rates: B's accuracy with DNI, without B's gradient, and with it.

    python -m benchmarks.two_clocks [--quick] [--epochs N] [--json PATH]

`examples/two_clocks.yaml` (Jaderberg et al. 2016, section 3.3): A reads a digit per seq for
its parity; B ticks every 4 seqs on A's stacked outputs and counts the group's digits below 5.
Four variants, same seed and budget, trained in process (`train_in_process`, the mesh's own
node cores): A learns from B through its synthesizer (dni), or through one conditioned on each
sample's labels of both tasks (cdni); B's gradient cut (no_gradient); B's true gradient applied
when it comes back, A never waiting (delayed). A locked A that waits for
B every k seqs cannot be written: a stack edge needs its producer unlocked. Each variant then
runs once more as a real mesh of processes, shortened, for A's idle time: the `waiting` records
A wrote (it writes one per heartbeat with no progress) and its samples/s.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import dni_mesh
from dni_mesh.reference import train_in_process
from dni_mesh.topology import load_topology

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "two_clocks.yaml"
VARIANTS = {"dni": ["mode=dni"], "cdni": [], "no_gradient": ["mode=dni", "nodes.b.args.detach=true"],
            "delayed": ["mode=delayed"]}


def train(overrides: list[str]) -> dict:
    """One in-process run: each head's accuracy at every evaluation, and the time it took."""
    started = time.monotonic()
    bus = train_in_process(load_topology(EXAMPLE, overrides))
    curves = {head: [round(r.values["test_accuracy"], 4) for node, r in bus.records
                     if node == head and r.values.get("event") == "eval"] for head in ("parity", "b")}
    steps = {n: sum(1 for node, r in bus.records if node == n and r.values.get("event") == "step")
             for n in ("a", "b")}
    return {"b_accuracy": curves["b"][-1], "parity_accuracy": curves["parity"][-1],
            "curves": curves, "steps": steps, "train_s": round(time.monotonic() - started, 1)}


def idle(overrides: list[str]) -> dict:
    """One real mesh run: A's waiting records (any, and those naming b) and its samples/s."""
    with tempfile.TemporaryDirectory() as folder:
        summary = dni_mesh.run(EXAMPLE, overrides, quiet=True, run_dir=Path(folder))
        records = [json.loads(line) for line in (Path(folder) / "a.jsonl").read_text().splitlines()]
    waits = [r for r in records if r.get("event") == "waiting"]
    rates = [r["samples_per_s"] for r in records if r.get("event") == "step"]
    return {"a_waiting_records": len(waits),
            "a_waiting_for_b": sum("from b" in r["waiting_for"] for r in waits),
            "a_samples_per_s": round(rates[-1], 1), "wall_s": summary["wall_s"],
            "b_steps": summary["nodes"]["b"]["steps"], "a_steps": summary["nodes"]["a"]["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, a short mesh run")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], help="extra dotted.key=value")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/two_clocks.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    epochs = 2 if args.quick else args.epochs
    budget = [f"data.epochs={epochs}", f"data.eval_every={epochs}", *args.set]
    mesh = ["data.epochs=1", f"data.args.batches={40 if args.quick else 400}",
            "data.args.test_batches=8", "checkpoint.every=0", *args.set]
    results = {}
    for name, overrides in VARIANTS.items():
        results[name] = {**train(budget + overrides), "mesh": idle(mesh + overrides)}
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "curves"}), flush=True)
    report = {"example": "examples/two_clocks.yaml", "overrides": budget, "mesh_overrides": mesh,
              "torch": torch.__version__, "variants": results}
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
