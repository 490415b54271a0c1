"""`dni-mesh bench`: the mesh side by side with its ceiling and with the pipeline a user would pick.

For every (mode, link delay) pair it runs the whole mesh on the same topology, stages and data,
changing only `mode` and `links.default.delay_ms`. Beside those runs, in the same process and
on the same machine (so ratios between rows are fair even when absolute numbers are noisy):
- `reference`: the single-process chain trainer, one row per mode: no network at all, the
  ceiling the mesh's messaging overhead is measured against;
- `pipelining-gpipe`: torch.distributed.pipelining's GPipe over gloo, one process per stage.
  The link emulation is the mesh's own transport: it cannot delay gloo's sockets (and the
  kernel has no `tc netem`), so this row exists at delay 0 only.

Every row has samples/s (training only, from the second batch on, evaluation passes taken out,
as the head's TrainClock counts them), final test accuracy, wall time, and the time at which
test accuracy first reached the target, counted from the start of that row's run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dni_mesh.build import build_source, chain_config
from dni_mesh.launch import run
from dni_mesh.node import TrainClock
from dni_mesh.pipelining import run_gpipe
from dni_mesh.reference import ChainTrainer
from dni_mesh.topology import Topology, TopologyError, load_topology

SYSTEMS = ("mesh", "reference", "pipelining-gpipe")
NO_DELAY_NOTE = ("gloo's traffic bypasses the mesh's link emulation (and the kernel has no tc "
                 "netem): measured at delay 0 only")


@dataclass
class Row:
    """One measured run. evals: (seconds since the run started, test accuracy) per evaluation."""
    system: str
    mode: str
    delay_ms: float
    samples_per_s: float | None
    test_accuracy: float | None
    wall_s: float
    time_to_target_s: float | None
    evals: list[tuple[float, float]]
    run_dir: str | None = None
    note: str = ""


@dataclass
class BenchConfig:
    topology: Path
    modes: list[str]
    delays_ms: list[float]
    run_dir: Path
    overrides: list[str] = field(default_factory=list)
    target: float = 0.9
    microbatches: int = 4


def parse_delay(text: str) -> float:
    """'0', '2ms', '0.05s' or a bare number of milliseconds -> milliseconds."""
    number, scale = text.strip().lower(), 1.0
    if number.endswith("ms"):
        number = number[:-2]
    elif number.endswith("s"):
        number, scale = number[:-1], 1000.0
    try:
        value = float(number) * scale
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise ValueError(f"delay {text!r}: expected milliseconds, e.g. 0, 10ms or 0.05s")
    return value


def time_to_target(evals: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, accuracy in evals if accuracy >= target), None)


def eval_due(topology: Topology, epoch: int) -> bool:
    """Whether the mesh's source evaluates after this (1-based) epoch; the peers follow it."""
    data = topology.data
    return epoch == data.epochs or bool(data.eval_every and epoch % data.eval_every == 0)


def mesh_row(config: BenchConfig, mode: str, delay_ms: float) -> Row:
    """Run the whole mesh once. Head records carry seconds since the head's own start; the
    launcher's wall time minus the head's last record is the start-up before it (estimated to
    within the head's exit time, a fraction of a second), so the two add up to run time."""
    overrides = [*config.overrides, f"mode={mode}", f"links.default.delay_ms={delay_ms:g}"]
    run_dir = config.run_dir / f"mesh-{mode}-{delay_ms:g}ms"
    summary = run(config.topology, overrides, run_dir=run_dir, live=False)
    head = load_topology(config.topology, overrides).heads[0]
    records = [json.loads(line) for line in (run_dir / f"{head}.jsonl").read_text().splitlines()]
    offset = summary["wall_s"] - records[-1]["time"]
    evals = [(round(offset + r["time"], 3), r["test_accuracy"]) for r in records
             if r.get("event") == "eval"]
    return Row("mesh", mode, delay_ms, summary["train_samples_per_s"], summary["test_accuracy"],
               summary["wall_s"], time_to_target(evals, config.target), evals, str(run_dir))


def reference_row(config: BenchConfig, mode: str) -> Row:
    """The single-process chain trainer on the same batches, one batch in flight."""
    topology = load_topology(config.topology, [*config.overrides, f"mode={mode}"])
    started = time.monotonic()
    trainer = ChainTrainer(chain_config(topology))
    train, test = build_source(topology, "train"), build_source(topology, "test")
    clock, evals = TrainClock(), []
    for epoch in range(1, topology.data.epochs + 1):
        for batch, (x, y) in enumerate(train.iterate(epoch - 1)):
            if topology.data.limit is not None and batch >= topology.data.limit:
                break
            clock.tick(len(y))
            trainer.step(x, y)
        if eval_due(topology, epoch):
            eval_start = time.monotonic()
            accuracy = trainer.evaluate(test).accuracy
            clock.pause(time.monotonic() - eval_start)
            evals.append((round(time.monotonic() - started, 3), accuracy))
    return Row("reference", mode, 0.0, clock.rate(), evals[-1][1],
               round(time.monotonic() - started, 3), time_to_target(evals, config.target), evals,
               note="one process, no network: the ceiling")


def gpipe_row(config: BenchConfig) -> Row:
    run_dir = config.run_dir / "pipelining-gpipe"
    result = run_gpipe(config.topology, config.overrides, run_dir, config.microbatches)
    return Row("pipelining-gpipe", "backprop", 0.0, result.samples_per_s, result.test_accuracy,
               round(result.wall_s, 3), time_to_target(result.evals, config.target),
               result.evals, str(run_dir),
               note=f"{result.stages} stages, {result.microbatches} microbatches; {NO_DELAY_NOTE}")


def run_bench(config: BenchConfig, progress=print) -> dict:
    """Every mesh (mode, delay) pair, then the reference rows and the GPipe row when the
    topology is a chain (they need one); returns the report that `--json` writes."""
    rows: list[Row] = []
    notes: list[str] = []
    for mode in config.modes:
        for delay in config.delays_ms:
            progress(f"bench: mesh, mode {mode}, delay {delay:g} ms")
            rows.append(mesh_row(config, mode, delay))
    topology = load_topology(config.topology, config.overrides)
    try:
        chain_config(topology)
    except ValueError as error:
        notes.append(f"no reference or pipelining rows: {error}")
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(topology.nodes[topology.heads[0]].threads)  # as much as one node
        try:
            for mode in config.modes:
                progress(f"bench: reference, mode {mode}")
                rows.append(reference_row(config, mode))
        finally:
            torch.set_num_threads(threads)
        progress(f"bench: pipelining-gpipe ({config.microbatches} microbatches)")
        rows.append(gpipe_row(config))
    notes.append(f"pipelining-gpipe: {NO_DELAY_NOTE}")
    return {"topology": str(config.topology), "overrides": config.overrides,
            "target": config.target, "microbatches": config.microbatches, "machine": machine(),
            "rows": [asdict(row) for row in rows], "notes": notes}


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available()}


def table(report: dict) -> str:
    """The rows as a fixed-width text table."""
    header = ("system", "mode", "delay ms", "samples/s", "test acc", "wall s",
              f"s to {report['target']:g}")
    lines = [header]
    for r in report["rows"]:
        lines.append((r["system"], r["mode"], f"{r['delay_ms']:g}", _num(r["samples_per_s"], ".0f"),
                      _num(r["test_accuracy"], ".4f"), _num(r["wall_s"], ".1f"),
                      _num(r["time_to_target_s"], ".1f")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if i > 1 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(line, widths))) for line in lines)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def plot(report: dict, path: Path) -> None:
    """Samples/s against link delay, and test accuracy against wall time, side by side."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise RuntimeError("--plot needs matplotlib: pip install 'dni_mesh[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    modes = list(dict.fromkeys(r["mode"] for r in rows if r["system"] == "mesh"))
    colour = {mode: f"C{i}" for i, mode in enumerate(modes)}
    delays = sorted({r["delay_ms"] for r in rows if r["system"] == "mesh"})
    styles = dict(zip(delays, ["-", "--", "-.", ":"] * len(delays)))
    fig, (speed, curve) = plt.subplots(1, 2, figsize=(13, 5))
    for mode in modes:
        mesh = sorted((r for r in rows if r["system"] == "mesh" and r["mode"] == mode),
                      key=lambda r: r["delay_ms"])
        speed.plot([r["delay_ms"] for r in mesh], [r["samples_per_s"] for r in mesh], "o-",
                   color=colour[mode], label=f"mesh {mode}")
    for r in rows:
        c = colour.get(r["mode"], "k")
        if r["system"] == "reference":
            speed.axhline(r["samples_per_s"], color=c, ls=":", lw=1,
                          label=f"reference {r['mode']} (no network)")
        elif r["system"] == "pipelining-gpipe":
            speed.plot([0], [r["samples_per_s"]], "k*", ms=12, label="GPipe on gloo (delay 0 only)")
        times, accuracy = zip(*r["evals"]) if r["evals"] else ((), ())
        if r["system"] == "mesh":
            curve.plot(times, accuracy, styles[r["delay_ms"]], marker=".", color=c,
                       label=f"mesh {r['mode']} {r['delay_ms']:g} ms")
        elif r["system"] == "reference":
            curve.plot(times, accuracy, "s:", color=c, label=f"reference {r['mode']}")
        else:
            curve.plot(times, accuracy, "k*-", label="GPipe on gloo")
    speed.set_xscale("symlog", linthresh=1)
    speed.set_xticks(delays, [f"{d:g}" for d in delays])
    speed.set(xlabel="link delay per message (ms)", ylabel="training samples/s",
              title="throughput against link delay")
    curve.axhline(report["target"], color="grey", lw=0.5)
    curve.set(xlabel="seconds since the run started", ylabel="test accuracy",
              title="test accuracy against wall time")
    speed.legend(fontsize=7)
    curve.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check(config: BenchConfig) -> None:
    """Refuse a bad mode, override or microbatch count before the first run starts."""
    for mode in config.modes:
        topology = load_topology(config.topology, [*config.overrides, f"mode={mode}"])
    if topology.data.batch_size % config.microbatches:
        raise ValueError(f"batch_size {topology.data.batch_size} does not split into "
                         f"--microbatches {config.microbatches} equal parts")


def bench_main(args: argparse.Namespace) -> int:
    """The `dni-mesh bench` command: 2 for bad settings; a failed or interrupted run raises,
    for the CLI to report as it does for `dni-mesh run`."""
    try:
        config = BenchConfig(
            topology=Path(args.topology), modes=[m.strip() for m in args.modes.split(",")],
            delays_ms=[parse_delay(d) for d in args.delays.split(",")],
            run_dir=args.run_dir or Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}",
            overrides=args.overrides, target=args.target, microbatches=args.microbatches)
        check(config)
    except (TopologyError, ValueError) as error:
        print(f"dni-mesh bench: {error}", file=sys.stderr)
        return 2
    report = run_bench(config)
    print(table(report))
    for note in report["notes"]:
        print(f"note: {note}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0
