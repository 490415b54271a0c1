"""Complete unlock on MNIST: test accuracy with synthetic inputs, beside the same FCN without.

    python -m benchmarks.complete_unlock [--epochs N] [--variants a,b] [--no-mesh] [--json PATH]

`examples/mnist_complete_unlock.yaml` (Jaderberg et al. 2016, section 3.4): l2 and l3 update on
module(I(x)), their synthetic inputs, as soon as the source's batch arrives. Every variant
trains in process (`train_in_process`: the mesh's node cores, one batch in flight, equal to the
mesh at window 1), same seed and budget; then the complete-unlock example runs once as a real
mesh of processes, for the issue's target (at least 97.5% in the mesh) and its samples/s.
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

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mnist_complete_unlock.yaml"
LOCKED_INPUTS = ["nodes.l2.synthetic_input=null", "nodes.l3.synthetic_input=null"]
VARIANTS = {"cdni_complete_unlock": [], "cdni": LOCKED_INPUTS,
            "dni_complete_unlock": ["mode=dni"], "dni": ["mode=dni", *LOCKED_INPUTS],
            "backprop": ["mode=backprop", *LOCKED_INPUTS]}


def accuracies(records: list[dict]) -> list[float]:
    return [round(r["test_accuracy"], 4) for r in records if r.get("event") == "eval"]


def in_process(overrides: list[str]) -> dict:
    """One in-process run: the head's accuracy after every epoch, and the time it took."""
    started = time.monotonic()
    bus = train_in_process(load_topology(EXAMPLE, overrides))
    curve = accuracies([r.values for node, r in bus.records if node == "head"])
    return {"test_accuracy": curve[-1], "curve": curve, "train_s": round(time.monotonic() - started, 1)}


def mesh(overrides: list[str]) -> dict:
    """One run as processes: the head's accuracy after every epoch, its training samples/s and
    the wall time."""
    with tempfile.TemporaryDirectory() as folder:
        summary = dni_mesh.run(EXAMPLE, overrides, quiet=True, run_dir=Path(folder))
        records = [json.loads(line) for line in (Path(folder) / "head.jsonl").read_text().splitlines()]
    curve = accuracies(records)
    return {"test_accuracy": curve[-1], "curve": curve, "wall_s": summary["wall_s"],
            "train_samples_per_s": summary["train_samples_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-mesh", action="store_true", help="skip the run as processes")
    parser.add_argument("--set", action="append", default=[], help="extra dotted.key=value")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/complete_unlock.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # as one node process: the in-process numbers are the mesh's
    budget = [f"data.epochs={args.epochs}", *args.set]
    results = {}
    for name in args.variants.split(","):
        results[name] = in_process(budget + VARIANTS[name])
        print(name, json.dumps(results[name]), flush=True)
    report = {"example": "examples/mnist_complete_unlock.yaml", "overrides": budget,
              "torch": torch.__version__, "in_process": results}
    if not args.no_mesh:
        report["mesh"] = mesh(budget)
        print("mesh", json.dumps(report["mesh"]), flush=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
