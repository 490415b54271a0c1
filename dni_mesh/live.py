"""What a person watching `dni-mesh run` sees: a live table of nodes, then a final table.

On a terminal the table redraws in place (rich's Live); elsewhere (CI logs, pipes) only
evaluation results and the final table are printed, so logs stay short.
"""

from __future__ import annotations

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
    def __init__(self, topology: Topology, enabled: bool = True, console: Console | None = None):
        self.topology = topology
        self.console = console or Console()
        self.enabled = enabled and self.console.is_terminal
        self.live: Live | None = None
        self.printed: dict[str, int] = {}

    def __enter__(self) -> LiveView:
        if self.enabled:
            self.live = Live(console=self.console, refresh_per_second=4, transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc_info)
            self.live = None

    def table(self, nodes: dict, title: str) -> Table:
        table = Table(title=title)
        for column in COLUMNS:
            table.add_column(column, justify="left" if column in ("node", "role", "status") else "right")
        for name, node in nodes.items():
            latest = {**node.latest, **node.final}
            accuracy = node.evals[-1]["test_accuracy"] if node.evals else None
            table.add_row(name, self.topology.nodes[name].role, str(node.process.pid),
                          _fmt(latest.get("step")), _fmt(latest.get("loss")),
                          _fmt(latest.get("sg_loss")), _fmt(latest.get("samples_per_s")),
                          _fmt(accuracy), _fmt(latest.get("status") or latest.get("error") or "running"))
        return table

    def refresh(self, nodes: dict) -> None:
        if self.live is not None:
            self.live.update(self.table(nodes, f"dni-mesh: {self.topology.name}"))
        for name in self.topology.heads:
            evals = nodes[name].evals if name in nodes else []
            for record in evals[self.printed.get(name, 0):]:
                self.console.print(f"eval {len(evals)}: {name} test accuracy "
                                   f"{record['test_accuracy']:.4f} (loss {record['test_loss']:.4f})")
            self.printed[name] = len(evals)

    def final_table(self, nodes: dict, summary: dict) -> None:
        self.console.print(self.table(nodes, f"dni-mesh: {self.topology.name} finished"))
        self.console.print(f"mode {summary['mode']}  test accuracy {_fmt(summary['test_accuracy'])}  "
                           f"train samples/s {_fmt(summary['train_samples_per_s'])}  "
                           f"wall {summary['wall_s']:.1f} s  run folder {summary['run_dir']}")
