"""What a person watching `dni-mesh run` sees: a live table of nodes, then a final table.

On a terminal the table redraws in place (rich's Live) with the source's epoch and an ETA;
elsewhere (CI logs, pipes) only epochs, evaluation results, restarts and rejoins of nodes and
the final table are printed, the table as plain text that is never cut to a terminal width.
`quiet` prints nothing at all.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from dni_mesh.topology import Topology

COLUMNS = ("node", "role", "pid", "step", "loss", "sg_loss", "samples/s", "test acc", "status")


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


class LiveView:
    def __init__(self, topology: Topology, enabled: bool = True, quiet: bool = False,
                 console: Console | None = None):
        self.topology = topology
        self.console = console or Console()
        self.quiet = quiet
        self.enabled = enabled and not quiet and self.console.is_terminal
        self.live: Live | None = None
        self.printed: dict[str, int] = {}
        self.epochs_printed = 0
        self.started = time.monotonic()

    def __enter__(self) -> LiveView:
        if self.enabled:
            self.live = Live(console=self.console, refresh_per_second=4, transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc_info)
            self.live = None

    def rows(self, nodes: dict) -> list[list[str]]:
        rows = []
        for name, node in nodes.items():
            latest = {**node.latest, **node.final}
            accuracy = node.evals[-1].get("test_accuracy") if node.evals else None
            rows.append([name, self.topology.nodes[name].role, str(node.process.pid),
                         _fmt(latest.get("step")), _fmt(latest.get("loss")),
                         _fmt(latest.get("sg_loss")), _fmt(latest.get("samples_per_s")),
                         _fmt(accuracy), status(latest)])
        return rows

    def table(self, nodes: dict, title: str) -> Table:
        table = Table(title=title)
        for column in COLUMNS:
            table.add_column(column, justify="left" if column in ("node", "role", "status") else "right")
        for row in self.rows(nodes):
            table.add_row(*row)
        return table

    def progress(self, nodes: dict) -> str:
        """The source's epoch of the run's epochs, and the time left at the pace so far."""
        source = nodes.get(self.topology.source)
        epoch = source.latest.get("epoch", 0) if source is not None else 0
        total = self.topology.data.epochs
        text = f"epoch {epoch}/{total}"
        if epoch:
            elapsed = time.monotonic() - self.started
            text += f", ETA {elapsed / epoch * (total - epoch):.0f} s"
        return text

    def note(self, text: str) -> None:
        """A line about the run as it happens (a node restarted, a node rejoined), printed above
        the live table or into the plain log alike."""
        if not self.quiet:
            self.console.print(text, soft_wrap=True)

    def refresh(self, nodes: dict) -> None:
        if self.quiet:
            return
        if self.live is not None:
            self.live.update(self.table(nodes, f"dni-mesh: {self.topology.name}, {self.progress(nodes)}"))
        source = nodes.get(self.topology.source)
        epoch = source.latest.get("epoch", 0) if source is not None else 0
        if epoch > self.epochs_printed:
            self.epochs_printed = epoch
            self.console.print(f"{self.progress(nodes)} (the source has sent epoch {epoch})")
        for name in self.topology.heads:
            evals = nodes[name].evals if name in nodes else []
            for record in evals[self.printed.get(name, 0):]:
                bits = (f"{_fmt(record['test_bits_per_token'])} bits per token, "
                        if "test_bits_per_token" in record else "")
                self.console.print(f"eval {len(evals)}: {name} test accuracy "
                                   f"{_fmt(record.get('test_accuracy'))} ({bits}loss "
                                   f"{_fmt(record.get('test_loss'))}, "
                                   f"{record.get('test_labelled', 0)} labels scored in "
                                   f"{record.get('test_samples', 0)} samples)")
            self.printed[name] = len(evals)

    def final_table(self, nodes: dict, summary: dict) -> None:
        if self.quiet:
            return
        title = f"dni-mesh: {self.topology.name} finished"
        if self.console.is_terminal:
            self.console.print(self.table(nodes, title))
        else:
            print(plain_table(title, [list(COLUMNS), *self.rows(nodes)]), flush=True)
        bits = summary.get("test_bits_per_token")
        self.console.print(f"mode {summary['mode']}  test accuracy {_fmt(summary['test_accuracy'])}  "
                           + (f"test bits/token {_fmt(bits)}  " if bits is not None else "")
                           + f"train samples/s {_fmt(summary['train_samples_per_s'])}  "
                           f"wall {summary['wall_s']:.1f} s  run folder {summary['run_dir']}",
                           soft_wrap=True)


def status(latest: dict) -> str:
    """A node's state (`running`, `restarting`, `rejoined`, its final status, its error), with
    how often the launcher restarted it: here rather than in a column of its own, which would
    widen every row of every run for what happens in few."""
    text = str(latest.get("status") or latest.get("error") or "running")
    restarts = latest.get("restarts")
    return f"{text} ({restarts_text(restarts)})" if restarts else text


def restarts_text(count: int) -> str:
    return f"{count} restart" + ("" if count == 1 else "s")


def plain_table(title: str, rows: list[list[str]]) -> str:
    """Rows as aligned plain text, as wide as they need: for logs and pipes."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [title] + ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                       for row in rows]
    return "\n".join(lines)
