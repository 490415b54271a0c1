"""TensorBoard event files of a run, through `torch.utils.tensorboard` (the `tensorboard` extra).

Two ways in, one layout: every scalar goes to `RUN_DIR/tensorboard` under the tag `NODE/KEY`
(`head/loss`, `l1/sg_loss`, `head/test_accuracy`, `l2/samples_per_s`, `source/epoch`) with the
record's step as TensorBoard's step.

- Live: the launcher makes a `TensorBoardLog(run_dir / "tensorboard")` and calls
  `log(node, values)` for each metrics message it takes. Nodes forward metrics at most twice a
  second (plus every evaluation and final record), so a live log is a sample of the run.
- After the fact: `export(run_dir)` (`dni-mesh plot RUN_DIR --tensorboard`) converts every
  record of the run folder's NODE.jsonl files. It replaces the event files already in
  RUN_DIR/tensorboard (a live log included: the export holds every record).

Which numbers become scalars: every finite number of a record except the bookkeeping keys
(node, time, step, seq); `fit` records give only `sg_loss` (their samples/s repeats the step
records'), `final` records only `samples_per_s` (the rest are counters, not a series). A
record without a step (evaluations, the source's epochs) takes the node's latest step.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dni_mesh.plot import MissingExtra, RunLog, read_run

TENSORBOARD_EXTRA = "pip install -e '.[tensorboard]'"
SUBDIR = "tensorboard"
BOOKKEEPING = frozenset({"node", "time", "step", "seq", "event"})
EVENT_FILE_PREFIX = "events.out.tfevents."


def summary_writer_class() -> type:
    """torch's SummaryWriter, or MissingExtra naming the extra that installs tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise MissingExtra(f"TensorBoard event files need the tensorboard package ({error}): "
                           f"{TENSORBOARD_EXTRA}") from None
    return SummaryWriter


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one record that become scalars, by key."""
    event = values.get("event")
    picked = {key: float(value) for key, value in values.items()
              if key not in BOOKKEEPING and isinstance(value, (int, float))
              and not isinstance(value, bool) and math.isfinite(value)}
    if event == "fit":
        picked = {k: v for k, v in picked.items() if k == "sg_loss"}
    elif event == "final":
        picked = {k: v for k, v in picked.items() if k == "samples_per_s"}
    return picked


class TensorBoardLog:
    """One SummaryWriter for a whole run; scalars tagged NODE/KEY at the record's step."""

    def __init__(self, log_dir: Path | str, flush_secs: int = 10):
        writer = summary_writer_class()
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = writer(log_dir=str(self.log_dir), flush_secs=flush_secs)
        self.steps: dict[str, int] = {}  # each node's latest step, for records without one
        self.written = 0

    def log(self, node: str, values: Mapping[str, Any], walltime: float | None = None) -> int:
        """Add the record's scalars (see `scalars`); returns how many were added. walltime:
        seconds since the epoch, default now."""
        step = values.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            self.steps[node] = step
        else:
            step = self.steps.get(node, 0)
        picked = scalars(values)
        for key, value in picked.items():
            self.writer.add_scalar(f"{node}/{key}", value, step, walltime=walltime)
        self.written += len(picked)
        return len(picked)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def export(run_dir: Path | str, run: RunLog | None = None) -> Path:
    """Write RUN_DIR/tensorboard from the run folder's NODE.jsonl files; returns that folder.

    Event files already there are replaced. Each record's wall time is its node's start (the
    file's modification time less its last record's time) plus the record's time. Raises
    RunFolderError for a folder without NODE.jsonl, MissingExtra without tensorboard.
    """
    run_dir = Path(run_dir)
    run = run or read_run(run_dir)
    summary_writer_class()  # fail before touching the folder
    out = run_dir / SUBDIR
    if out.is_dir():
        for old in out.glob(EVENT_FILE_PREFIX + "*"):
            old.unlink()
    with TensorBoardLog(out) as board:
        for name, node in run.nodes.items():
            last = max((r["time"] for r in node.records), default=0.0)
            try:
                started = os.path.getmtime(node.path) - last
            except OSError:
                started = time.time() - last
            for record in node.records:
                board.log(name, record, walltime=started + record["time"])
    return out
