"""`dni-mesh bench` on a tiny mesh: real node processes, real link delays, the real GPipe peer.

One command runs every row kind (mesh per mode and delay, reference per mode, GPipe on gloo) on
Gaussian blobs through three small processes per mesh, so the file stays within a minute on two
cores; the timeouts are generous because every process imports torch.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dni_mesh.bench import Row, parse_delay, steady_rate, summarise, time_to_target, variant
from dni_mesh.cli import main
from dni_mesh.topology import load_topology
from dni_mesh.transport import free_port_range

ROW_KEYS = {"system", "mode", "delay_ms", "samples_per_s", "test_accuracy", "wall_s",
            "time_to_target_s", "evals", "repeat", "run_dir", "note"}


def tiny(tmp_path: Path) -> Path:
    topology = {
        "name": "tiny-bench", "mode": "dni", "seed": 5,
        "data": {"source": "nodes.data:Blobs", "batch_size": 32, "epochs": 2, "eval_every": 1,
                 "limit": 6, "args": {"num_samples": 256, "dim": 8, "num_classes": 3}},
        "defaults": {"optimizer": {"name": "adam", "lr": 1e-2}, "window": 4,
                     "synthetic_gradient": {"optimizer": {"name": "adam", "lr": 1e-3}}},
        "nodes": {"source": {"role": "source"},
                  "l1": {"module": "nodes.mlp:Block", "args": {"d_in": 8, "d_out": 16}},
                  "head": {"role": "head", "module": "nodes.mlp:Classifier",
                           "args": {"d_in": 16, "classes": 3}}},
        "edges": ["source -> l1", "l1 -> head"],
        "hosts": {"local": {"address": "127.0.0.1", "base_port": free_port_range(16)}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    return path


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dni_mesh.cli", "bench", *args],
                          capture_output=True, text=True, timeout=150)


@pytest.mark.timeout(180)
def test_bench_rows_for_every_mode_and_delay_beside_reference_and_gpipe(tmp_path):
    pytest.importorskip("matplotlib")
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    result = bench(str(tiny(tmp_path)), "--modes", "backprop,dni", "--delays", "0,5ms",
                   "--target", "0.5", "--json", str(report_path), "--plot", str(plot_path),
                   "--run-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    rows = report["rows"]
    assert all(set(row) == ROW_KEYS for row in rows)
    mesh = {(r["mode"], r["delay_ms"]) for r in rows if r["system"] == "mesh"}
    assert mesh == {("backprop", 0), ("backprop", 5), ("dni", 0), ("dni", 5)}
    assert sorted(r["mode"] for r in rows if r["system"] == "reference") == ["backprop", "dni"]
    [gpipe] = [r for r in rows if r["system"] == "pipelining-gpipe"]
    assert gpipe["delay_ms"] == 0 and "delay 0 only" in gpipe["note"]
    assert len(rows) == 7
    for row in rows:
        assert row["samples_per_s"] > 0 and row["wall_s"] > 0
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert len(row["evals"]) == 2  # eval_every 1, two epochs
        times = [t for t, _ in row["evals"]]
        assert times == sorted(times) and 0 < times[-1] <= row["wall_s"] + 1.0
        assert row["test_accuracy"] == row["evals"][-1][1]
        reached = [t for t, accuracy in row["evals"] if accuracy >= 0.5]
        assert row["time_to_target_s"] == (reached[0] if reached else None)
    summary = {(s["system"], s["mode"], s["delay_ms"]): s for s in report["summary"]}
    assert len(summary) == 7 and all(s["runs"] == 1 for s in summary.values())
    assert summary["mesh", "dni", 0]["vs_delay_0"] == 1.0
    assert summary["mesh", "backprop", 5]["vs_backprop"] == 1.0
    assert "samples/s" in result.stdout and "pipelining-gpipe" in result.stdout
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, expected", [
    (["--modes", "backprop,sideways"], "sideways"),
    (["--delays", "0,fast"], "fast"),
    (["--microbatches", "5"], "microbatches"),
])
def test_bad_settings_exit_2_before_any_run(tmp_path, capsys, args, expected):
    """`dni-mesh bench` in this process (as test_docs runs commands): the settings are refused
    before any process starts, so there is no interpreter to pay for."""
    code = main(["bench", str(tiny(tmp_path)), *args, "--run-dir", str(tmp_path / "runs")])
    assert code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_complete_unlock_gives_every_stage_not_fed_by_the_source_a_synthetic_input():
    example = Path(__file__).parents[1] / "examples" / "bench_mnist.yaml"
    overrides = variant(example, [], "complete_unlock")
    assert overrides == ["mode=cdni", "nodes.l2.synthetic_input={}", "nodes.l3.synthetic_input={}"]
    unlocked = load_topology(example, overrides)
    assert [e.name for e in unlocked.edges if e.kind == "trigger"] == ["source->l2", "source->l3"]
    assert variant(example, [], "dni") == ["mode=dni"]
    dag = Path(__file__).parents[1] / "examples" / "mnist_dag.yaml"  # fan-in stages stay as they are
    load_topology(dag, variant(dag, [], "complete_unlock"))


def test_parse_delay():
    assert [parse_delay(t) for t in ("0", "2ms", "0.05s", " 10 ")] == [0.0, 2.0, 50.0, 10.0]
    for bad in ("-1ms", "nan", "soon"):
        with pytest.raises(ValueError, match="delay"):
            parse_delay(bad)


def test_time_to_target_is_the_first_eval_at_or_above_it():
    evals = [(1.0, 0.5), (2.0, 0.9), (3.0, 0.85), (4.0, 0.95)]
    assert time_to_target(evals, 0.9) == 2.0
    assert time_to_target(evals, 0.99) is None


def test_steady_rate_counts_the_batches_after_the_first():
    assert steady_rate([1.0, 2.0, 3.0], samples=30, first_batch=10) == 10.0
    assert steady_rate([1.0], samples=10, first_batch=10) is None


def test_summary_takes_medians_over_repeats_and_ratios():
    def row(system, mode, delay, rate, reached, repeat):
        return Row(system, mode, delay, rate, 0.9, 10.0, reached, [(reached or 9.0, 0.9)], repeat)

    rows = [row("mesh", "backprop", 0.0, 100.0, 5.0, 0), row("mesh", "dni", 0.0, 400.0, None, 0),
            row("mesh", "backprop", 0.0, 300.0, 6.0, 1), row("mesh", "dni", 0.0, 600.0, 4.0, 1),
            row("mesh", "dni", 0.0, 500.0, None, 2), row("mesh", "dni", 50.0, 450.0, 3.0, 0)]
    lines = {(s["mode"], s["delay_ms"]): s for s in summarise(rows)}
    dni = lines["dni", 0.0]
    assert (dni["runs"], dni["samples_per_s"], dni["samples_per_s_min"], dni["samples_per_s_max"]) \
        == (3, 500.0, 400.0, 600.0)
    assert dni["time_to_target_s"] is None  # two of three runs never reached it
    assert lines["backprop", 0.0]["time_to_target_s"] == 5.0  # the lower median
    assert dni["vs_backprop"] == 2.5 and lines["dni", 50.0]["vs_delay_0"] == 0.9
