"""The Penn Treebank example with its edges and clocks varied: test bits per character per epoch.

    python -m benchmarks.ptb_variants [--set KEY=VALUE ...] [--json PATH]

Trains `examples/ptb_char_dni.yaml`, with the overrides given, in one process with the mesh's
own node cores (`dni_mesh.reference.train_in_process`, one thread), and prints the head's test
bits per character after each epoch. Each row of the table in benchmarks/README.md ("The Penn
Treebank example") is one call, e.g. the locked truncated-BPTT baseline:

    python -m benchmarks.ptb_variants --set mode=backprop --set defaults.time=bptt

About 5 minutes a call on an idle core of the 2-core benchmark machine.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dni_mesh.reference import train_in_process
from dni_mesh.topology import load_topology

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ptb_char_dni.yaml"


def test_bpc(overrides: list[str]) -> dict:
    """One in-process run: the head's test bits per character at every evaluation, and its time."""
    started = time.monotonic()
    bus = train_in_process(load_topology(EXAMPLE, ["checkpoint.every=0", *overrides]))
    curve = [round(r.values["test_bits_per_token"], 4) for node, r in bus.records
             if node == "head" and r.values.get("event") == "eval"]
    return {"overrides": overrides, "test_bpc": curve, "train_s": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], help="dotted.key=value")
    parser.add_argument("--json", type=Path, help="also write the result there")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {**test_bpc(args.set), "torch": torch.__version__}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
