"""Start-up of `dni-mesh run`: seconds from launching the command until the head's first
training step, with nodes forked from the fork server and with a fresh interpreter per node,
alternated in one run so that both see the same machine. Also times `dni-mesh validate` of every
example, and the imports that set the floor: torch, and torch._dynamo (the first optimizer of a
process imports it).

    python benchmarks/startup.py --repeat 5 --json benchmarks/results/startup.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def seconds_of(command: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.monotonic() - started


def first_step(topology: Path, start: str, folder: Path) -> float:
    """Seconds from launching `dni-mesh run` to the head's first step (one short epoch)."""
    summary = folder / f"summary-{start}.json"
    launched = time.monotonic()
    subprocess.run([sys.executable, "-m", "dni_mesh.cli", "run", str(topology), "--no-live",
                    "--start", start, "--set", "data.limit=8", "--set", "data.epochs=1",
                    "--set", "data.eval_every=0", "--run-dir", str(folder / start),
                    "--summary", str(summary)], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    total = time.monotonic() - launched
    report = json.loads(summary.read_text())
    # first_step_s counts from the launcher's run(); the rest of the wall is the command's own
    # start before it (interpreter, imports) and its end after the run (which we subtract).
    return total - report["wall_s"] + report["first_step_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", type=Path, default=ROOT / "examples" / "mnist_dni.yaml")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    imports = {
        "python": [sys.executable, "-c", "pass"],
        "torch": [sys.executable, "-c", "import torch"],
        "torch + torch._dynamo": [sys.executable, "-c", "import torch, torch._dynamo"],
    }
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeat):
            for name, command in imports.items():
                times.setdefault(f"import {name}", []).append(seconds_of(command))
            for start in ("fork", "exec"):
                times.setdefault(f"first step, --start {start}", []).append(
                    first_step(args.topology, start, Path(folder)))
            for example in EXAMPLES:
                times.setdefault(f"validate {example.name}", []).append(seconds_of(
                    [sys.executable, "-m", "dni_mesh.cli", "validate", str(example)]))
    medians = {name: round(statistics.median(values), 2) for name, values in times.items()}
    fork, exec_ = medians["first step, --start fork"], medians["first step, --start exec"]
    report = {"topology": str(args.topology.relative_to(ROOT)), "repeat": args.repeat,
              "median_s": medians, "all_s": {k: [round(v, 2) for v in vs] for k, vs in times.items()},
              "exec_over_fork": round(exec_ / fork, 2), "load_average": os.getloadavg()}
    for name, value in medians.items():
        print(f"{name:45s} {value:6.2f} s")
    print(f"first step: exec / fork = {report['exec_over_fork']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
