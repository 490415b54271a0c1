"""`dni-mesh bench`: the mesh side by side with its ceiling and with the pipeline a user would pick.

For every (mode, link delay) pair it runs the whole mesh on the same topology, stages and data,
changing only `mode` and `links.default.delay_ms`. Beside those runs, on the same machine in the
same command (so ratios between rows are fair even when absolute numbers are noisy):
- `reference`: the single-process chain trainer, one row per mode: no network at all, the
  ceiling the mesh's messaging overhead is measured against;
- `pipelining-gpipe`: torch.distributed.pipelining's GPipe over gloo, one process per stage.
  The link emulation is the mesh's own transport: it cannot delay gloo's sockets (and the
  kernel has no `tc netem`), so this row exists at delay 0 only.

Samples/s is the steady-state training rate at the loss: the samples after the first batch over
the time from the first training step's end to the last's, on the head (or last stage). The
evaluation passes in that span count as time: the unlocked mesh keeps training upstream while
the head evaluates, so taking them out would count that work without its time. Time to target
is the first evaluation at or above the target accuracy, from the start of that run (process
start-up included). With `repeat` > 1 the whole grid runs again, round-robin, and the summary
takes medians, because a shared machine's load moves between runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dni_mesh.build import build_source
from dni_mesh.forkserver import ForkServer, node_environment
from dni_mesh.launch import run
from dni_mesh.pipelining import run_gpipe
from dni_mesh.reference import ChainConfig, ChainTrainer, chain_names
from dni_mesh.topology import Topology, TopologyError, load_topology

COMPLETE_UNLOCK = "complete_unlock"
"""A bench mode beyond the topology's: cdni, with a synthetic input on every stage that is not
fed by the source (paper section 3.4); `variant` spells it as overrides."""
NO_DELAY_NOTE = ("gloo's traffic bypasses the mesh's link emulation (and the kernel has no tc "
                 "netem): measured at delay 0 only")


@dataclass
class Row:
    """One measured run. evals: (seconds since the run started, test accuracy) per evaluation."""
    system: str  # "mesh" | "reference" | "pipelining-gpipe"
    mode: str
    delay_ms: float
    samples_per_s: float | None
    test_accuracy: float | None
    wall_s: float
    time_to_target_s: float | None
    evals: list[tuple[float, float]]
    repeat: int = 0
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
    repeat: int = 1


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


def steady_rate(step_ends: list[float], samples: int, first_batch: int) -> float | None:
    """Samples after the first batch over the time from the first step's end to the last's."""
    span = step_ends[-1] - step_ends[0] if len(step_ends) > 1 else 0.0
    return (samples - first_batch) / span if span > 0 else None


def time_to_target(evals: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, accuracy in evals if accuracy >= target), None)


def eval_due(topology: Topology, epoch: int) -> bool:
    """Whether the mesh's source evaluates after this (1-based) epoch; the peers follow it."""
    data = topology.data
    return epoch == data.epochs or bool(data.eval_every and epoch % data.eval_every == 0)


def variant(path: Path, overrides: list[str], mode: str) -> list[str]:
    """The overrides that make a bench mode of a topology: `mode=...`, and for complete unlock
    cdni with a synthetic input (default settings) on each stage that can take one: a
    feed-forward cdni stage with one input, not the source's data."""
    if mode != COMPLETE_UNLOCK:
        return [f"mode={mode}"]
    topology = load_topology(path, [*overrides, "mode=cdni"])
    fed = {e.dst for e in topology.outputs(topology.source)}
    return ["mode=cdni", *(f"nodes.{name}.synthetic_input={{}}" for name, spec in topology.nodes.items()
                           if spec.role == "stage" and spec.mode == "cdni" and spec.time is None
                           and name not in fed and len(topology.inputs(name)) == 1)]


def mesh_row(config: BenchConfig, mode: str, delay_ms: float, repeat: int,
             forkserver: ForkServer) -> Row:
    """Run the whole mesh once and read its head's records.

    Head records carry seconds since the head's own start. The launcher's wall time minus the
    head's last record is the start-up before it (overestimated by the head's exit, a fraction of
    a second), so the two add up to seconds since the run started.
    """
    overrides = [*config.overrides, *variant(config.topology, config.overrides, mode),
                 f"links.default.delay_ms={delay_ms:g}"]
    topology = load_topology(config.topology, overrides)
    run_dir = config.run_dir / f"mesh-{mode}-{delay_ms:g}ms-{repeat}"
    summary = run(config.topology, overrides, run_dir=run_dir, live=False, topology=topology,
                  forkserver=forkserver)
    head = topology.heads[0]
    records = [json.loads(line) for line in (run_dir / f"{head}.jsonl").read_text().splitlines()]
    offset = summary["wall_s"] - records[-1]["time"]
    evals = [(round(offset + r["time"], 3), r["test_accuracy"]) for r in records
             if r.get("event") == "eval"]
    steps = [r["time"] for r in records if r.get("event") == "step"]
    rate = steady_rate(steps, records[-1]["samples"], topology.data.batch_size)
    return Row("mesh", mode, delay_ms, rate, summary["test_accuracy"], summary["wall_s"],
               time_to_target(evals, config.target), evals, repeat, str(run_dir))


def reference_row(config: BenchConfig, mode: str, repeat: int) -> Row:
    """The single-process chain trainer on the same batches, one batch in flight."""
    topology = load_topology(config.topology, [*config.overrides, f"mode={mode}"])
    started = time.monotonic()
    trainer = ChainTrainer(ChainConfig.from_topology(topology))
    train, test = build_source(topology, "train"), build_source(topology, "test")
    step_ends, evals, samples = [], [], 0
    for epoch in range(1, topology.data.epochs + 1):
        for batch, (x, y) in enumerate(train.iterate(epoch - 1)):
            if topology.data.limit is not None and batch >= topology.data.limit:
                break
            trainer.step(x, y)
            samples += len(y)
            step_ends.append(time.monotonic() - started)
        if eval_due(topology, epoch):
            evals.append((round(time.monotonic() - started, 3), trainer.evaluate(test).accuracy))
    return Row("reference", mode, 0.0, steady_rate(step_ends, samples, topology.data.batch_size),
               evals[-1][1], round(time.monotonic() - started, 3),
               time_to_target(evals, config.target), evals, repeat,
               note="one process, no network: the ceiling")


def gpipe_row(config: BenchConfig, repeat: int) -> Row:
    run_dir = config.run_dir / f"pipelining-gpipe-{repeat}"
    result = run_gpipe(config.topology, config.overrides, run_dir, config.microbatches)
    samples = len(result.step_ends) * result.batch_size
    return Row("pipelining-gpipe", "backprop", 0.0,
               steady_rate(result.step_ends, samples, result.batch_size), result.test_accuracy,
               round(result.wall_s, 3), time_to_target(result.evals, config.target),
               result.evals, repeat, str(run_dir),
               note=f"{result.stages} stages, {result.microbatches} microbatches; {NO_DELAY_NOTE}")


def run_bench(config: BenchConfig, progress: Callable[[str], None] = print) -> dict:
    """The whole grid `repeat` times: each delay's modes back to back (so the ratios between
    modes come from neighbouring runs), then the reference rows and the GPipe row when the
    topology is a chain (they need one). Returns the report that `--json` writes."""
    topology = load_topology(config.topology, config.overrides)
    try:
        chain_names(topology)
        peers, notes = True, [f"pipelining-gpipe: {NO_DELAY_NOTE}"]
    except ValueError as error:
        peers, notes = False, [f"no reference or pipelining rows: {error}"]
    rows: list[Row] = []
    forkserver = ForkServer(node_environment())  # one for every mesh run: torch imported once
    try:
        for repeat in range(config.repeat):
            rows += bench_repeat(config, topology, peers, repeat, forkserver, progress)
    finally:
        forkserver.close()
    return {"topology": str(config.topology), "overrides": config.overrides,
            "target": config.target, "microbatches": config.microbatches,
            "repeat": config.repeat, "machine": machine(), "summary": summarise(rows),
            "rows": [asdict(row) for row in rows], "notes": notes}


def bench_repeat(config: BenchConfig, topology: Topology, peers: bool, repeat: int,
                 forkserver: ForkServer, progress: Callable[[str], None]) -> list[Row]:
    """One pass over the grid: the mesh rows, then (for a chain) the reference and GPipe rows."""
    rows = []
    for delay in config.delays_ms:
        for mode in config.modes:
            progress(f"bench {repeat + 1}/{config.repeat}: mesh, mode {mode}, delay {delay:g} ms")
            rows.append(mesh_row(config, mode, delay, repeat, forkserver))
    if not peers:
        return rows
    threads = torch.get_num_threads()
    torch.set_num_threads(topology.nodes[topology.heads[0]].threads)  # as much as one node
    try:
        for mode in [m for m in config.modes if m != COMPLETE_UNLOCK]:  # the chain trainer has none
            progress(f"bench {repeat + 1}/{config.repeat}: reference, mode {mode}")
            rows.append(reference_row(config, mode, repeat))
    finally:
        torch.set_num_threads(threads)
    progress(f"bench {repeat + 1}/{config.repeat}: pipelining-gpipe "
             f"({config.microbatches} microbatches)")
    rows.append(gpipe_row(config, repeat))
    return rows


def summarise(rows: list[Row]) -> list[dict]:
    """One line per (system, mode, delay): medians over the repeats, the spread of samples/s, and
    the rate relative to the same mode at delay 0 and to the locked mesh at the same delay."""
    groups: dict[tuple[str, str, float], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.system, row.mode, row.delay_ms), []).append(row)
    lines = []
    for (system, mode, delay), runs in groups.items():
        rates = [r.samples_per_s for r in runs if r.samples_per_s is not None]
        lines.append({
            "system": system, "mode": mode, "delay_ms": delay, "runs": len(runs),
            "samples_per_s": statistics.median(rates) if rates else None,
            "samples_per_s_min": min(rates, default=None),
            "samples_per_s_max": max(rates, default=None),
            "test_accuracy": statistics.median(r.test_accuracy for r in runs),
            "wall_s": statistics.median(r.wall_s for r in runs),
            "time_to_target_s": _median_time([r.time_to_target_s for r in runs])})
    rate = {(s["system"], s["mode"], s["delay_ms"]): s["samples_per_s"] for s in lines}
    for s in lines:
        s["vs_delay_0"] = _ratio(s["samples_per_s"], rate.get((s["system"], s["mode"], 0.0)))
        s["vs_backprop"] = (_ratio(s["samples_per_s"], rate.get(("mesh", "backprop", s["delay_ms"])))
                            if s["system"] == "mesh" else None)
    return lines


def _median_time(times: list[float | None]) -> float | None:
    """The lower median, a run that never reached the target counting as the slowest."""
    ordered = sorted(math.inf if t is None else t for t in times)
    middle = ordered[(len(ordered) - 1) // 2]
    return None if middle == math.inf else middle


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available()}


def table(report: dict) -> str:
    """The summary as a fixed-width text table."""
    header = ("system", "mode", "delay ms", "samples/s", "min-max", "vs 0 ms", "vs backprop",
              "test acc", "wall s", f"s to {report['target']:g}")
    lines = [header]
    for s in report["summary"]:
        spread = (f"{s['samples_per_s_min']:.0f}-{s['samples_per_s_max']:.0f}"
                  if s["runs"] > 1 and s["samples_per_s"] is not None else "")
        lines.append((s["system"], s["mode"], f"{s['delay_ms']:g}", _num(s["samples_per_s"], ".0f"),
                      spread, _num(s["vs_delay_0"], ".2f"), _num(s["vs_backprop"], ".2f"),
                      _num(s["test_accuracy"], ".4f"), _num(s["wall_s"], ".1f"),
                      _num(s["time_to_target_s"], ".1f")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if i > 1 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(line, widths))) for line in lines)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def plot(report: dict, path: Path) -> None:
    """Samples/s against link delay (medians, min-max bars), and test accuracy against time
    since the run started, for every repeat, at no delay and at the largest delay."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise RuntimeError("--plot needs matplotlib: pip install 'dni_mesh[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    modes = list(dict.fromkeys(s["mode"] for s in summary if s["system"] == "mesh"))
    colour = {mode: f"C{i}" for i, mode in enumerate(modes)}
    delays = sorted({s["delay_ms"] for s in summary if s["system"] == "mesh"})
    fig, (speed, curve) = plt.subplots(1, 2, figsize=(13, 6.5))
    for mode in modes:
        mesh = sorted((s for s in summary if s["system"] == "mesh" and s["mode"] == mode
                       and s["samples_per_s"] is not None), key=lambda s: s["delay_ms"])
        rates = [s["samples_per_s"] for s in mesh]
        spread = [[r - s["samples_per_s_min"] for r, s in zip(rates, mesh)],
                  [s["samples_per_s_max"] - r for r, s in zip(rates, mesh)]]
        speed.errorbar([s["delay_ms"] for s in mesh], rates, yerr=spread, fmt="o-", capsize=3,
                       color=colour[mode], label=f"mesh {mode}")
    for s in summary:
        if s["system"] == "reference" and s["samples_per_s"] is not None:
            speed.axhline(s["samples_per_s"], color=colour.get(s["mode"], "k"), ls=":", lw=1,
                          label=f"reference {s['mode']} (one process)")
        elif s["system"] == "pipelining-gpipe" and s["samples_per_s"] is not None:
            speed.plot([0], [s["samples_per_s"]], "k*", ms=12, label="GPipe on gloo (delay 0 only)")
    shown = {delays[0], delays[-1]}
    for r in report["rows"]:
        if not r["evals"] or (r["system"] == "mesh" and r["delay_ms"] not in shown):
            continue
        times, accuracy = zip(*r["evals"])
        if r["system"] == "mesh":
            line, marker = "-" if r["delay_ms"] == delays[0] else "--", "."
            label = f"mesh {r['mode']} {r['delay_ms']:g} ms"
        elif r["system"] == "reference":
            line, marker, label = ":", "s", f"reference {r['mode']}"
        else:
            line, marker, label = "-", "*", "GPipe on gloo"
        c = "k" if r["system"] == "pipelining-gpipe" else colour.get(r["mode"], "k")
        curve.plot(times, accuracy, ls=line, marker=marker, color=c, alpha=0.7,
                   label=None if r["repeat"] else label)
    speed.set_xscale("symlog", linthresh=1)
    speed.set_xticks(delays, [f"{d:g}" for d in delays])
    speed.set(xlabel="link delay per message, each way (ms)", ylabel="training samples/s",
              title="throughput against link delay")
    curve.axhline(report["target"], color="grey", lw=0.5)
    curve.set(xlabel="seconds since the run started (process start-up included)",
              ylabel="test accuracy", title="test accuracy against wall time")
    for axes in (speed, curve):
        axes.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check(config: BenchConfig) -> None:
    """Refuse a bad mode, override or microbatch count before the first run starts."""
    for mode in config.modes:
        topology = load_topology(config.topology,
                                 [*config.overrides, *variant(config.topology, config.overrides, mode)])
    if topology.data.batch_size % config.microbatches:
        raise ValueError(f"batch_size {topology.data.batch_size} does not split into "
                         f"--microbatches {config.microbatches} equal parts")
    if config.repeat < 1:
        raise ValueError(f"--repeat {config.repeat}: at least 1")


def bench_main(args: argparse.Namespace) -> int:
    """The `dni-mesh bench` command: 2 for bad settings; a failed or interrupted run raises,
    for the CLI to report as it does for `dni-mesh run`."""
    try:
        config = BenchConfig(
            topology=Path(args.topology), modes=[m.strip() for m in args.modes.split(",")],
            delays_ms=[parse_delay(d) for d in args.delays.split(",")],
            run_dir=args.run_dir or Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}",
            overrides=args.overrides, target=args.target, microbatches=args.microbatches,
            repeat=args.repeat)
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
