"""Looking at runs: `dni-mesh plot RUN_DIR [RUN_DIR...]` draws one PNG of a run, or of several
runs side by side.

A run folder (`dni-mesh run`, or the `--run-dir` of nodes started by hand) holds one
`NODE.jsonl` per node, a JSON object per line with `node`, `time` (seconds since that node
started) and `event`:

- `step`: `step`, `seq`, `samples_per_s` (the node's mean training rate so far), and `loss` on
  a head;
- `fit`: a synthesizer fitted on a returning gradient: `step`, `seq`, `sg_loss`;
- `eval`: on a head, `test_accuracy`, `test_loss`, `test_samples`;
- `epoch`: on the source, `epoch`, `sent`;
- `final`: `status` and the node's counters, `samples_per_s` among them.

Four panels, time on every x axis: the head loss, the test accuracy of each evaluation, the
synthesizer loss of each stage (log scale) and samples/s per node. Each run has one colour;
each node one line style (and marker), the same in every run. Noisy step series are smoothed
with a centred running mean, the raw points drawn faintly behind. A run without evaluations,
without synthesizers (backprop) or cut short by a crash still plots: its empty panels say what
is missing, lines that are not a whole JSON record (a crash mid-write) are skipped and counted,
and a run whose nodes did not all finish is marked in the legend.

`dni-mesh plot --rdm RUN_DIR...` draws instead each stage's representational dissimilarity
matrix on the fixed probe set (`dni_mesh.rdm`): one row per run, one column per stage and head.

This module reads runs without matplotlib; drawing imports it lazily (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_EXTRA = "pip install -e '.[bench]'"
METRICS_FILE = "metrics.jsonl"  # the launcher's copy of what nodes reported, sampled: not a node
NODES_FILE = "nodes.json"
MAX_SMOOTH = 50
LINE_STYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2, 2, 2)), (0, (1, 1)),
               (0, (3, 1, 1, 1, 1, 1, 1, 1))]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


class RunFolderError(ValueError):
    """A folder that is not a run folder: missing, or without any NODE.jsonl."""


class MissingExtra(RuntimeError):
    """An optional package is not installed; the message names the extra that installs it."""


@dataclass
class NodeLog:
    """The records of one NODE.jsonl, in file order, and what was wrong with the rest."""
    name: str
    path: Path
    records: list[dict[str, Any]]
    skipped: int = 0  # lines that are not a JSON object with an event and a numeric time
    first_skipped: int | None = None  # line number (1-based) of the first of them

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["event"] == event]

    @property
    def final(self) -> dict[str, Any] | None:
        finals = self.events("final")
        return finals[-1] if finals else None


@dataclass
class RunLog:
    """Every node log of one run folder."""
    path: Path
    nodes: dict[str, NodeLog]  # nodes.json order when there, else file name order
    label: str = ""
    dropped: dict[str, int] = field(default_factory=dict)  # "node key" -> non-finite values

    @property
    def skipped(self) -> int:
        return sum(node.skipped for node in self.nodes.values())

    def skipped_note(self) -> str | None:
        """Which files had malformed lines, or None when none had."""
        bad = [n for n in self.nodes.values() if n.skipped]
        if not bad:
            return None
        where = ", ".join(f"{n.path.name}: {n.skipped} (first at line {n.first_skipped})"
                          for n in bad)
        return f"{self.path}: skipped {self.skipped} malformed line(s): {where}"

    def unfinished(self) -> list[str]:
        """Nodes without a final record, or whose final status is not `done`."""
        return [name for name, node in self.nodes.items()
                if node.final is None or node.final.get("status") != "done"]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_node_log(path: Path, name: str | None = None) -> NodeLog:
    """Read one NODE.jsonl; skip (and count) lines that are not a whole record."""
    log = NodeLog(name or path.stem, path, [])
    with path.open("r", encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if (not isinstance(record, dict) or not isinstance(record.get("event"), str)
                    or not _number(record.get("time")) or not math.isfinite(record["time"])):
                log.skipped += 1
                log.first_skipped = log.first_skipped or number
                continue
            log.records.append(record)
    return log


def node_files(run_dir: Path) -> dict[str, Path]:
    """The NODE.jsonl files of a run folder: the nodes nodes.json names, where it exists and
    names any with a file, else every *.jsonl but the launcher's metrics.jsonl."""
    files = {p.stem: p for p in sorted(run_dir.glob("*.jsonl")) if p.name != METRICS_FILE}
    try:
        listed = json.loads((run_dir / NODES_FILE).read_text())
    except (OSError, ValueError):
        listed = None
    if isinstance(listed, dict):
        ordered = {name: files[name] for name in listed if name in files}
        if ordered:
            return ordered
    return files


def read_run(run_dir: Path | str) -> RunLog:
    """Read a run folder; RunFolderError naming it when it is missing or has no NODE.jsonl."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: no such run folder")
    files = node_files(run_dir)
    if not files:
        raise RunFolderError(f"{run_dir}: no NODE.jsonl files in this folder (is it the "
                             f"--run-dir of a `dni-mesh run` or of nodes started by hand?)")
    return RunLog(run_dir, {name: read_node_log(path, name) for name, path in files.items()})


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Centred running mean over `window` points; shorter at both ends."""
    if window <= 1 or len(values) < 3:
        return list(values)
    half = window // 2
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    n = len(values)
    return [(sums[min(n, i + half + 1)] - sums[max(0, i - half)])
            / (min(n, i + half + 1) - max(0, i - half)) for i in range(n)]


def smoothing_window(n: int, smooth: int | None) -> int:
    """The running-mean window: `smooth` when given, else a tenth of the series, at most 50."""
    if smooth is not None:
        return max(1, smooth)
    return max(1, min(MAX_SMOOTH, n // 10))


def series(run: RunLog, node: str, event: str, key: str,
           keep: Callable[[float], bool] = math.isfinite) -> tuple[list[float], list[float]]:
    """(times, values) of `key` in the node's `event` records; values that are not numbers are
    left out, and those `keep` refuses (non-finite by default) are counted in run.dropped."""
    times, values = [], []
    for record in run.nodes[node].events(event):
        value = record.get(key)
        if not _number(value):
            continue
        if not keep(value):
            if not math.isfinite(value):
                run.dropped[f"{node} {key}"] = run.dropped.get(f"{node} {key}", 0) + 1
            continue
        times.append(float(record["time"]))
        values.append(float(value))
    return times, values


def run_labels(paths: Sequence[Path]) -> list[str]:
    """The shortest trailing parts of each path that tell the runs apart (the folder name when
    the names differ)."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts)):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    full = [str(Path(*p)) for p in parts]  # a folder given twice: number the repeats
    return [f"{label} #{full[:i].count(label) + 1}" if full.count(label) > 1 else label
            for i, label in enumerate(full)]


def describe(run: RunLog) -> str:
    """A run's legend entry: its label, last test accuracy, and what went wrong."""
    notes = []
    heads = [n for n in run.nodes.values() if n.events("eval")]
    if heads:
        accuracy = heads[0].events("eval")[-1].get("test_accuracy")
        if _number(accuracy):
            notes.append(f"acc {accuracy:.4f}")
    unfinished = run.unfinished()
    if unfinished:
        notes.append(f"unfinished: {', '.join(unfinished)}")
    if run.skipped:
        notes.append(f"{run.skipped} bad line(s) skipped")
    return f"{run.label} ({'; '.join(notes)})" if notes else run.label


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingExtra(f"plotting needs matplotlib, the `bench` extra: {BENCH_EXTRA}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def draw(runs: Sequence[RunLog], smooth: int | None = None):
    """The figure of one or more runs: four panels (loss, test accuracy, synthesizer loss,
    samples/s) over time. Returns the matplotlib Figure; the caller saves and closes it."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    names = list(dict.fromkeys(name for run in runs for name in run.nodes))
    style = {name: (LINE_STYLES[i % len(LINE_STYLES)], MARKERS[i % len(MARKERS)])
             for i, name in enumerate(names)}
    fig, grid = plt.subplots(2, 2, figsize=(14, 9))
    loss_ax, acc_ax, sg_ax, rate_ax = grid.flat
    shown: dict[Any, list[str]] = {ax: [] for ax in grid.flat}  # node names drawn per panel

    def smoothed(ax, run_index: int, node: str, times: list[float], values: list[float]) -> None:
        colour, (line, _) = f"C{run_index % 10}", style[node]
        window = smoothing_window(len(values), smooth)
        if window > 1:
            ax.plot(times, values, color=colour, ls=line, lw=0.6, alpha=0.25)
        ax.plot(times, running_mean(values, window), color=colour, ls=line, lw=1.6)
        shown[ax].append(node)

    sg_any_positive = False
    rate_top, rate_max = 0.0, 0.0  # the highest rate once past each series' start, and overall
    for run in runs:
        run.dropped.clear()  # counted afresh by this drawing
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        for node in run.nodes:
            times, values = series(run, node, "step", "loss")
            if values:
                smoothed(loss_ax, i, node, times, values)
            times, values = series(run, node, "eval", "test_accuracy")
            if values:
                acc_ax.plot(times, values, color=colour, ls=style[node][0],
                            marker=style[node][1], ms=5)
                shown[acc_ax].append(node)
            times, values = series(run, node, "fit", "sg_loss")
            if values:
                sg_any_positive = sg_any_positive or max(values) > 0
                smoothed(sg_ax, i, node, times, values)
            # samples_per_s is the node's mean rate so far: no smoothing; 0 means "not yet known"
            times, values = series(run, node, "step", "samples_per_s",
                                   keep=lambda v: math.isfinite(v) and v > 0)
            final = run.nodes[node].final
            if final is not None and _number(final.get("samples_per_s")) \
                    and final["samples_per_s"] > 0 and math.isfinite(final["samples_per_s"]):
                times.append(float(final["time"]))
                values.append(float(final["samples_per_s"]))
            if values:
                rate_ax.plot(times, values, color=colour, ls=style[node][0], lw=1.4,
                             marker=style[node][1], markevery=[len(values) - 1], ms=6)
                shown[rate_ax].append(node)
                # a mean over the first few batches can be huge (two batches sent in 10 ms)
                skip = len(values) // 5 or (1 if len(values) > 1 else 0)
                rate_top = max(rate_top, max(values[skip:]))
                rate_max = max(rate_max, max(values))

    panels = [
        (loss_ax, "head loss (training batches)", "loss", "no step records with a loss (no head?)"),
        (acc_ax, "test accuracy per evaluation", "test accuracy", "no evaluation records"),
        (sg_ax, "synthesizer loss per stage (fit on the returning gradient)", "sg_loss (L2)",
         "no synthesizer fits (backprop, or none reached)"),
        (rate_ax, "samples/s per node (mean so far; marker: final)", "samples/s",
         "no samples/s recorded"),
    ]
    for ax, title, ylabel, empty in panels:
        ax.set(title=title, xlabel="seconds since the node started", ylabel=ylabel)
        ax.grid(alpha=0.3)
        nodes = list(dict.fromkeys(shown[ax]))
        if not nodes:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes,
                    color="0.4")
            continue
        handles = [Line2D([], [], color="0.3", ls=style[n][0],
                          marker=style[n][1] if ax in (acc_ax, rate_ax) else None, label=n)
                   for n in nodes]
        ax.legend(handles=handles, fontsize=8, title="node", title_fontsize=8,
                  ncol=2 if len(nodes) > 4 else 1)
    if sg_any_positive:  # zeros (a fresh downstream synthesizer says "no gradient") are masked
        sg_ax.set_yscale("log", nonpositive="mask")
    if shown[acc_ax]:
        acc_ax.set_ylim(top=1.0)
    if rate_max > 1.5 * rate_top:
        rate_ax.set_ylim(0, 1.15 * rate_top)
        rate_ax.text(0.01, 0.99, f"early rates up to {rate_max:.0f} clipped", va="top",
                     transform=rate_ax.transAxes, fontsize=8, color="0.4")
    run_handles = [Line2D([], [], color=f"C{i % 10}", lw=3, label=describe(run))
                   for i, run in enumerate(runs)]
    fig.legend(handles=run_handles, loc="upper center", ncol=min(len(runs), 3), fontsize=9,
               title="run folder", title_fontsize=9, bbox_to_anchor=(0.5, 1.0))
    rows = -(-len(runs) // 3)  # of the run legend; fixed margins: tight_layout costs ~1 s
    fig.subplots_adjust(left=0.07, right=0.985, bottom=0.06, top=0.93 - 0.03 * rows,
                        wspace=0.2, hspace=0.28)
    return fig


def load_runs(run_dirs: Sequence[Path | str]) -> list[RunLog]:
    """Read every run folder and give each its legend label."""
    runs = [read_run(d) for d in run_dirs]
    for run, label in zip(runs, run_labels([r.path for r in runs])):
        run.label = label
    return runs


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def save(fig, out: Path | str) -> Path:
    """Write a figure from `draw` to `out` (PNG unless the suffix names another format) and
    close it."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    finally:
        _pyplot().close(fig)
    return out


def notes(runs: Sequence[RunLog]) -> list[str]:
    """What a reader of the plot should know: skipped lines, values not drawn (counted by the
    last `draw`), nodes that did not finish."""
    said = []
    for run in runs:
        if (note := run.skipped_note()) is not None:
            said.append(note)
        for what, count in run.dropped.items():
            said.append(f"{run.path}: {count} non-finite {what} value(s) not drawn")
        if unfinished := run.unfinished():
            said.append(f"{run.path}: node(s) without a successful final record: "
                        f"{', '.join(unfinished)} (crashed, stopped or still running)")
    return said


def render(runs: Sequence[RunLog], out: Path | str, smooth: int | None = None,
           say: Callable[[str], None] = _stderr) -> Path:
    """Draw runs already read into `out`; say what was skipped or left out."""
    out = save(draw(runs, smooth), out)
    for note in notes(runs):
        say(note)
    return out


def plot_runs(run_dirs: list[Path], out: Path, smooth: int | None = None,
              say: Callable[[str], None] = _stderr) -> Path:
    """Draw the runs in `run_dirs` side by side into the PNG `out`; returns `out`.

    Raises RunFolderError for a folder without NODE.jsonl files, MissingExtra without
    matplotlib."""
    return render(load_runs(run_dirs), out, smooth, say)


def default_out(run_dirs: Sequence[Path | str]) -> Path:
    """RUN_DIR/plot.png for one run, ./runs-compare.png for several."""
    return Path(run_dirs[0]) / "plot.png" if len(run_dirs) == 1 else Path("runs-compare.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `dni-mesh plot`."""
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run folder(s) holding NODE.jsonl files (the --run-dir of a run)")
    parser.add_argument("--out", type=Path, metavar="PNG",
                        help="the image to write (default RUN_DIR/plot.png for one run, "
                             "./runs-compare.png for several)")
    parser.add_argument("--smooth", type=int, metavar="N",
                        help="running-mean window in records for loss and sg_loss (default: a "
                             "tenth of each series, at most 50; 1 draws the raw values)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard event files into RUN_DIR/tensorboard for "
                             "each run (needs the `tensorboard` extra)")
    parser.add_argument("--rdm", action="store_true",
                        help="draw instead each stage's representational dissimilarity matrix "
                             "on 400 test samples ordered by label (one row per run, one column "
                             "per stage; default out RUN_DIR/rdm.png, ./runs-rdm.png for several)")


def plot_main(args: argparse.Namespace) -> int:
    """`dni-mesh plot`: 0 done, 2 a folder that is not a run folder or a bad argument,
    1 a missing optional package (the message names the extra)."""
    run_dirs = list(args.run_dirs)
    if args.smooth is not None and args.smooth < 1:
        print(f"dni-mesh plot: --smooth {args.smooth}: at least 1", file=sys.stderr)
        return 2
    if getattr(args, "rdm", False):
        return rdm_main(args)
    try:
        runs = load_runs(run_dirs)
    except RunFolderError as error:
        print(f"dni-mesh plot: {error}", file=sys.stderr)
        return 2
    try:
        if args.tensorboard:
            from dni_mesh.tensorboard import export
            for run in runs:
                print(f"TensorBoard event files: {export(run.path, run)}")
        out = render(runs, args.out or default_out(run_dirs), args.smooth)
    except MissingExtra as error:
        print(f"dni-mesh plot: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


# Representational dissimilarity matrices (`--rdm`).

RDM_MAX = 2.0  # 1 - correlation lies in [0, 2]


def default_rdm_out(run_dirs: Sequence[Path | str]) -> Path:
    """RUN_DIR/rdm.png for one run, ./runs-rdm.png for several."""
    return Path(run_dirs[0]) / "rdm.png" if len(run_dirs) == 1 else Path("runs-rdm.png")


def draw_rdm(rows: Sequence[tuple[str, dict[str, Any]]], labels: Sequence[int]):
    """The RDM grid: one row per (run label, {node: [n, n] matrix}), one column per node (in
    the order first met), each matrix on the shared scale 0..2, class boundaries from `labels`
    (the probe samples' classes, grouped). Returns the Figure; the caller saves and closes it."""
    plt = _pyplot()
    columns = list(dict.fromkeys(name for _, matrices in rows for name in matrices))
    labels = [int(v) for v in labels]
    edges = [i for i in range(1, len(labels)) if labels[i] != labels[i - 1]]
    starts = [0, *edges]
    centres = [(a + b - 1) / 2 for a, b in zip(starts, [*edges, len(labels)])]
    names = [str(labels[a]) for a in starts]
    fig, grid = plt.subplots(len(rows), len(columns), squeeze=False,
                             figsize=(2.9 * len(columns) + 0.9, 2.7 * len(rows) + 0.5))
    image = None
    for r, (label, matrices) in enumerate(rows):
        for c, name in enumerate(columns):
            ax = grid[r][c]
            ax.set_title(f"{label}: {name}", fontsize=9)
            if name not in matrices:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"no node {name}", ha="center", va="center",
                        transform=ax.transAxes, color="0.4")
                continue
            image = ax.imshow(matrices[name], vmin=0.0, vmax=RDM_MAX, cmap="viridis",
                              interpolation="antialiased")
            for edge in edges:
                ax.axhline(edge - 0.5, color="white", lw=0.4, alpha=0.8)
                ax.axvline(edge - 0.5, color="white", lw=0.4, alpha=0.8)
            ax.set_xticks(centres, names, fontsize=6)
            ax.set_yticks(centres, names, fontsize=6)
            ax.tick_params(length=0)
    fig.subplots_adjust(left=0.06, right=0.88, bottom=0.05, top=0.92, wspace=0.25, hspace=0.3)
    if image is not None:
        bar = fig.add_axes([0.91, 0.15, 0.015, 0.7])
        fig.colorbar(image, cax=bar, label="1 - correlation")
    fig.suptitle(f"representational dissimilarity on {len(labels)} test samples, ordered by "
                 "class", fontsize=10)
    return fig


def plot_rdm(run_dirs: Sequence[Path | str], out: Path | str | None = None) -> Path:
    """Rebuild each run's stages from its saved state, compute their RDMs on the probe set and
    draw them into `out` (default: `default_rdm_out`). Raises RunFolderError (dni_mesh.rdm's
    MissingState) naming the folder and the missing file, MissingExtra without matplotlib."""
    _pyplot()  # MissingExtra before any work
    from dni_mesh.rdm import load_run_topology, probe_set, rdm, representations, saved_states
    topologies = [load_run_topology(path) for path in run_dirs]  # every folder checked first
    for path, topology in zip(run_dirs, topologies):
        saved_states(path, topology)
    rows, probes, labels = [], {}, None
    for path, topology, label in zip(run_dirs, topologies,
                                     run_labels([Path(d) for d in run_dirs])):
        data = topology.data
        key = repr((data.source, data.args, data.data_dir))
        if key not in probes:
            probes[key] = probe_set(topology)
        samples = probes[key]
        labels = samples[1] if labels is None else labels
        rows.append((label, {name: rdm(acts).numpy()
                             for name, acts in representations(path, samples).items()}))
    return save(draw_rdm(rows, labels.tolist()), out or default_rdm_out(run_dirs))


def rdm_main(args: argparse.Namespace) -> int:
    """`dni-mesh plot --rdm`: 0 done, 2 a run folder without its saved state or topology, or
    an argument that does not apply, 1 a missing optional package."""
    if args.tensorboard:
        print("dni-mesh plot: --tensorboard does not apply with --rdm", file=sys.stderr)
        return 2
    from dni_mesh.topology import TopologyError
    try:
        out = plot_rdm(list(args.run_dirs), args.out)
    except (RunFolderError, TopologyError) as error:
        print(f"dni-mesh plot: {error}", file=sys.stderr)
        return 2
    except MissingExtra as error:
        print(f"dni-mesh plot: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dni_mesh.plot RUN_DIR...`, the same as `dni-mesh plot`."""
    parser = argparse.ArgumentParser(prog="dni-mesh plot", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return plot_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
