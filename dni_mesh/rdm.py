"""Representations: what each stage of a finished run computes on a fixed probe set, and its
representational dissimilarity matrix (RDM), as Czarnecki et al. 2017 compare backprop, DNI
and cDNI.

A run folder holds what is needed to rebuild every stage after the run: the launcher's copy of
the topology file (`topology.yaml`), how it was loaded (`run.json`: overrides, root folder,
data folder), and each stage's and head's final state (`NODE.pt`, `Stage.state_dict()`, saved by the node when its loop ends).
`representations(run_dir)` rebuilds the mesh on the CPU, loads those states and runs the probe
set (`probe_set`: the first 400 // classes test samples of each class, in the test split's
order, grouped by label: the same in every run) through it in eval mode. `rdm(acts)` is
1 - the Pearson correlation between the samples' activation vectors: 0 for two samples a
stage represents alike (up to scale and offset), 2 for opposite ones. Drawing lives in
`dni_mesh.plot` (`dni-mesh plot --rdm RUN_DIR...`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from dni_mesh.build import build_source, build_stage, probe
from dni_mesh.plot import RunFolderError
from dni_mesh.topology import Topology, load_topology

PROBE_SAMPLES = 400
TOPOLOGY_FILE = "topology.yaml"  # the launcher's copy of the topology file
RUN_FILE = "run.json"  # {"overrides": [...], "root": ..., "data_dir": ...}


class MissingState(RunFolderError):
    """A run folder without what rebuilding its stages needs (topology.yaml, NODE.pt)."""


def probe_set(topology: Topology, samples: int = PROBE_SAMPLES) -> tuple[Tensor, Tensor]:
    """(x, y): the first samples // num_classes test samples of each class, in the test split's
    file order, grouped by label (class 0 first). Deterministic: the same in every run."""
    test = build_source(topology, "test")
    classes = int(test.num_classes)
    per_class = max(1, samples // classes)
    taken: dict[int, list[Tensor]] = {c: [] for c in range(classes)}
    count = {c: 0 for c in range(classes)}
    for x, y in test:
        for c in range(classes):
            need = per_class - count[c]
            if need > 0:
                rows = (y == c).nonzero().flatten()[:need]
                if len(rows):
                    taken[c].append(x[rows])
                    count[c] += len(rows)
        if all(n >= per_class for n in count.values()):
            break
    short = {c: n for c, n in count.items() if n < per_class}
    if short:
        raise ValueError(f"the test split of {topology.data.source} has fewer than {per_class} "
                         f"samples of class(es) {', '.join(map(str, short))}")
    x = torch.cat([part for c in range(classes) for part in taken[c]])
    y = torch.arange(classes).repeat_interleave(per_class)
    return x, y


def _need(run_dir: Path, file: str, what: str) -> Path:
    path = run_dir / file
    if not path.is_file():
        raise MissingState(f"{run_dir}: no {file} ({what}); a run folder of `dni-mesh run` "
                           f"has it once the run has finished")
    return path


def load_run_topology(run_dir: Path | str) -> Topology:
    """The topology a run ran: its copy in the run folder with the saved overrides, re-rooted
    at the original file's folder (node module imports, a relative data_dir), every node on
    the CPU."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingState(f"{run_dir}: no such run folder")
    path = _need(run_dir, TOPOLOGY_FILE, "the launcher's copy of the topology file")
    saved: dict = {}
    if (run_dir / RUN_FILE).is_file():
        saved = json.loads((run_dir / RUN_FILE).read_text())
    topology = load_topology(path, saved.get("overrides", []), check_imports=False)
    root = Path(saved["root"]) if saved.get("root") else topology.root
    data = topology.data
    if saved.get("data_dir"):
        data = replace(data, data_dir=Path(saved["data_dir"]))
    nodes = {name: replace(spec, device="cpu") for name, spec in topology.nodes.items()}
    return replace(topology, root=root, data=data, nodes=nodes)


def stage_nodes(topology: Topology) -> list[str]:
    """The stages and heads, in topological order: the columns of an RDM figure."""
    return [n for n in topology.topological_order() if topology.nodes[n].role != "source"]


def saved_states(run_dir: Path | str, topology: Topology) -> dict[str, Path]:
    """Each stage's and head's NODE.pt; MissingState naming the first one absent."""
    return {name: _need(Path(run_dir), f"{name}.pt", f"the final state of node {name}")
            for name in stage_nodes(topology)}


@torch.no_grad()
def representations(run_dir: Path | str, samples: tuple[Tensor, Tensor] | None = None
                    ) -> dict[str, Tensor]:
    """Each stage's output (and each head's logits) on the probe set, flattened per sample
    ([samples, features], float32), in topological order. MissingState names the run folder
    and the file when topology.yaml or a NODE.pt is absent. `samples`: the probe set, when
    already built (it is the same for every run of one data source)."""
    run_dir = Path(run_dir)
    topology = load_run_topology(run_dir)
    names = stage_nodes(topology)
    states = saved_states(run_dir, topology)
    x, _ = samples if samples is not None else probe_set(topology)
    found = probe(topology)  # every shape, so each node builds only its own module
    outputs: dict[str, Tensor] = {topology.source: x}
    for name in names:
        stage = build_stage(topology, name, found)
        try:
            state = torch.load(states[name], map_location="cpu", weights_only=True)
            stage.load_state_dict(state)
        except Exception as error:
            raise MissingState(f"{states[name]}: not the state of node {name} of {TOPOLOGY_FILE} "
                               f"({type(error).__name__}: {error})") from error
        stage.module.eval()
        outputs[name] = stage.module(*[outputs[e.src] for e in topology.inputs(name)])
    return {name: outputs[name].reshape(len(x), -1).float() for name in names}


def rdm(acts: Tensor) -> Tensor:
    """[samples, samples]: 1 - Pearson correlation between the rows of acts ([samples, ...]),
    in [0, 2], zero on the diagonal. A sample whose activations are all equal (no variance:
    e.g. every ReLU off) correlates with nothing: dissimilarity 1 to every other sample."""
    a = acts.reshape(len(acts), -1).double()
    a = a - a.mean(dim=1, keepdim=True)
    norm = a.norm(dim=1, keepdim=True)
    a = torch.where(norm > 0, a / norm.clamp_min(1e-300), torch.zeros_like(a))
    d = (1.0 - a @ a.T).clamp(0.0, 2.0)
    d.fill_diagonal_(0.0)
    return d.float()
