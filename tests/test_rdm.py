"""Representations: the RDM itself on hand-made activations, the probe set, and a hand-made run
folder (topology.yaml + NODE.pt, no processes) rebuilt and drawn by `dni-mesh plot --rdm`."""

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from dni_mesh.build import build_stage, probe
from dni_mesh.plot import add_arguments, plot_main
from dni_mesh.rdm import MissingState, probe_set, rdm, representations, stage_nodes
from dni_mesh.topology import load_topology

DATA = Path(os.environ.get("DNI_MESH_DATA",
                           Path(__file__).parents[2] / "shared" / "data")).resolve()
needs_mnist = pytest.mark.skipif(not (DATA / "mnist").is_dir(),
                                 reason=f"MNIST not found under {DATA} (set DNI_MESH_DATA)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_rdm_of_hand_made_activations():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    acts = torch.stack([a, a, 2 * a + 5, -a, torch.tensor([1.0, -1.0, -1.0, 1.0])])
    d = rdm(acts)
    assert d.shape == (5, 5)
    assert torch.allclose(d, d.T)
    assert torch.allclose(d.diagonal(), torch.zeros(5))
    assert d[0, 1] == pytest.approx(0.0, abs=1e-6)  # identical
    assert d[0, 2] == pytest.approx(0.0, abs=1e-6)  # same pattern, other scale and offset
    assert d[0, 3] == pytest.approx(2.0, abs=1e-6)  # anti-correlated
    assert d[0, 4] == pytest.approx(1.0, abs=1e-6)  # uncorrelated
    # against numpy's Pearson correlation on random activations, [samples, C, H, W]
    x = torch.randn(6, 2, 3, 3)
    import numpy as np
    expected = 1 - np.corrcoef(x.reshape(6, -1).numpy())
    assert np.allclose(rdm(x).numpy(), expected, atol=1e-5)


def test_rdm_of_a_sample_without_variance():
    d = rdm(torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
    assert not torch.isnan(d).any()
    assert d[0, 0] == 0 and d[0, 1] == pytest.approx(1.0) and d[1, 2] == pytest.approx(2.0)


def chain(tmp_path: Path) -> Path:
    """source -> l1 -> l2 -> head on MNIST, narrow layers, plus a fan-in c (l1, l2) -> head2."""
    topology = {
        "name": "rdm-test", "mode": "dni", "seed": 3,
        "data": {"source": "mnist", "batch_size": 64, "epochs": 1, "eval_every": 0,
                 "limit": 4, "data_dir": str(DATA)},
        "defaults": {"optimizer": {"name": "adam", "lr": 1e-3}, "window": 1,
                     "synthetic_gradient": {"hidden": 0,
                                            "optimizer": {"name": "adam", "lr": 1e-3}}},
        "nodes": {"source": {"role": "source"},
                  "l1": {"module": "nodes.mlp:Block", "args": {"d_in": 784, "d_out": 16}},
                  "l2": {"module": "nodes.mlp:Block", "args": {"d_in": 16, "d_out": 16}},
                  "head": {"role": "head", "module": "nodes.mlp:Classifier",
                           "args": {"d_in": 16, "classes": 10}}},
        "edges": ["source -> l1", "l1 -> l2", "l2 -> head"],
        "hosts": {"local": {"address": "127.0.0.1", "base_port": 47000}},
    }
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    return path


def hand_made_run(tmp_path: Path, folder: str, perturb: float = 0.0) -> Path:
    """A run folder as a finished `dni-mesh run` leaves it, for representations: the topology
    copy, the overrides and each stage's state (perturbed, to tell runs apart)."""
    source = chain(tmp_path)
    topology = load_topology(source)
    run_dir = tmp_path / folder
    run_dir.mkdir()
    (run_dir / "topology.yaml").write_text(source.read_text())
    (run_dir / "run.json").write_text(json.dumps(
        {"overrides": [], "root": str(topology.root), "data_dir": str(topology.data.data_dir)}))
    found = probe(topology)
    for name in stage_nodes(topology):
        stage = build_stage(topology, name, found)
        if perturb:
            with torch.no_grad():
                for p in stage.module.parameters():
                    p.add_(perturb * torch.randn_like(p))
        torch.save(stage.state_dict(), run_dir / f"{name}.pt")
    return run_dir


@needs_mnist
def test_probe_set_is_ordered_by_label_and_fixed(tmp_path):
    topology = load_topology(chain(tmp_path))
    x, y = probe_set(topology)
    assert x.shape[0] == y.shape[0] == 400
    assert y.tolist() == [c for c in range(10) for _ in range(40)]
    x2, y2 = probe_set(topology)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # the first 40 of each class in the test split's order
    from dni_mesh.build import build_source
    xs, ys = zip(*build_source(topology, "test"))
    xs, ys = torch.cat(xs), torch.cat(ys)
    first = (ys == 3).nonzero().flatten()[:40]
    assert torch.equal(x[120:160], xs[first])


@needs_mnist
def test_representations_and_plot_of_hand_made_runs(tmp_path):
    a = hand_made_run(tmp_path, "dni")
    b = hand_made_run(tmp_path, "backprop", perturb=0.5)
    reps = representations(a)
    assert list(reps) == ["l1", "l2", "head"]
    assert [tuple(t.shape) for t in reps.values()] == [(400, 16), (400, 16), (400, 10)]
    assert not torch.equal(reps["l1"], representations(b)["l1"])
    d = rdm(reps["l2"])
    assert d.shape == (400, 400) and 0 <= d.min() and d.max() <= 2

    def plot(*argv) -> int:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return plot_main(parser.parse_args([str(v) for v in argv]))

    assert plot("--rdm", a) == 0
    assert (a / "rdm.png").read_bytes()[:8] == PNG_MAGIC
    out = tmp_path / "both.png"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dni_mesh import plot as plot_module
    figures = []
    draw = plot_module.draw_rdm
    plot_module.draw_rdm = lambda *args: figures.append(draw(*args)) or figures[-1]
    try:
        assert plot("--rdm", a, b, "--out", out) == 0
    finally:
        plot_module.draw_rdm = draw
    assert out.read_bytes()[:8] == PNG_MAGIC
    images = [ax for ax in figures[0].axes if ax.images and ax.get_title()]
    assert len(images) == 2 * 3  # rows (runs) x columns (stages and head)
    assert images[0].get_title() == "dni: l1" and images[-1].get_title() == "backprop: head"
    plt.close("all")


@needs_mnist
def test_missing_state_names_the_folder_and_file(tmp_path, capsys):
    run_dir = hand_made_run(tmp_path, "run")
    (run_dir / "l2.pt").unlink()
    with pytest.raises(MissingState, match=r"run: no l2\.pt"):
        representations(run_dir)
    (run_dir / "topology.yaml").unlink()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert plot_main(parser.parse_args(["--rdm", str(run_dir)])) == 2
    assert f"{run_dir}: no topology.yaml" in capsys.readouterr().err
