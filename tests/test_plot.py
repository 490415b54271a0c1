"""`dni-mesh plot` and the TensorBoard export: hand-written run folders (DNI, backprop, crashed)
and one real short run of four node processes on Gaussian blobs."""

import argparse
import json
import math
import random
import sys
from pathlib import Path

import pytest
import yaml

from dni_mesh.plot import (MissingExtra, RunFolderError, add_arguments, default_out, draw,
                           load_runs, notes, plot_main, plot_runs, read_run, running_mean, save)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_run(folder: Path, mode: str = "dni", stages: tuple[str, ...] = ("l1", "l2"),
                  steps: int = 60, evals: int = 2, seed: int = 0) -> Path:
    """A run folder as `dni-mesh run` leaves it: nodes.json and one NODE.jsonl per node with
    step, fit (unless backprop), eval, epoch and final records, noisy and plausible."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    names = ["source", *stages, "head"]
    (folder / "nodes.json").write_text(json.dumps({n: 1000 + i for i, n in enumerate(names)}))
    end = 2.0 + steps * 0.05
    counters = {"steps": steps, "eval_batches": 4 * evals, "samples": 64 * steps,
                "unexpected": 0, "rejected": 0, "bad_messages": 0, "dropped_messages": 0}

    def final(name: str, rate: float) -> dict:
        return {"node": name, "time": round(end + 0.5, 4), "event": "final", "status": "done",
                **counters, "samples_per_s": rate}

    source = [{"node": "source", "time": round(2.0 + (e + 1) * steps / evals * 0.05, 4),
               "event": "epoch", "epoch": e + 1, "sent": (e + 1) * steps // evals}
              for e in range(evals)] + [final("source", 900.0)]
    logs = {"source": source}
    for name in [*stages, "head"]:
        records = []
        for step in range(1, steps + 1):
            t = round(2.0 + step * 0.05, 4)
            record = {"node": name, "time": t, "event": "step", "step": step, "seq": step - 1,
                      "samples_per_s": 0.0 if step == 1 else 1000 * (1 - math.exp(-step / 10))}
            if name == "head":
                record["loss"] = 2.3 * math.exp(-step / 30) + 0.2 + rng.uniform(-0.1, 0.1)
            records.append(record)
            if name != "head" and mode != "backprop" and step > 2:
                records.append({"node": name, "time": t + 0.01, "event": "fit", "step": step,
                                "seq": step - 3, "samples_per_s": record["samples_per_s"],
                                "sg_loss": 0.0 if step == 3 else
                                1e-4 * math.exp(-step / 20) * rng.uniform(0.5, 1.5)})
            if name == "head" and evals and step % (steps // evals) == 0:
                records.append({"node": name, "time": t + 0.2, "event": "eval",
                                "test_samples": 256, "test_labelled": 256,
                                "test_accuracy": 0.5 + 0.4 * step / steps,
                                "test_loss": 1.0 - 0.5 * step / steps})
        logs[name] = records + [final(name, 1000.0)]
    for name, records in logs.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def crash(folder: Path, node: str = "l2", keep: int = 20) -> int:
    """Cut a node's log as a crash would (no final record, half a line at the end) and spoil a
    few more lines; returns how many malformed lines the folder now has."""
    lines = (folder / f"{node}.jsonl").read_text().splitlines()[:keep]
    lines[3:3] = ["not json at all", "[1, 2, 3]", json.dumps({"node": node, "event": "step"}),
                  json.dumps({"node": node, "time": "soon", "event": "step"})]
    lines.append('{"node": "l2", "time": 3.1, "eve')
    (folder / f"{node}.jsonl").write_text("\n".join(lines))
    return 5


def is_png(path: Path) -> tuple[int, int]:
    """(height, width) of a PNG written by the plot."""
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 20_000
    return matplotlib.image.imread(path).shape[:2]


def colours(ax) -> set[str]:
    from matplotlib.colors import to_hex

    return {to_hex(line.get_color()) for line in ax.get_lines()}


def hex_of(n: int) -> str:
    from matplotlib.colors import to_hex

    return to_hex(f"C{n}")


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return plot_main(parser.parse_args(list(argv)))


@pytest.fixture
def matplotlib():
    return pytest.importorskip("matplotlib",
                               reason="needs the bench extra: pip install -e '.[bench]'")


@pytest.fixture
def tensorboard():
    return pytest.importorskip("tensorboard", reason="needs the tensorboard extra: "
                                                     "pip install -e '.[tensorboard]'")


def test_running_mean_is_centred_and_keeps_the_ends():
    assert running_mean([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.5, 2.0, 3.0, 4.0, 4.5]
    assert running_mean([3.0, 1.0], 5) == [3.0, 1.0]
    assert running_mean([1.0, 2.0, 3.0], 1) == [1.0, 2.0, 3.0]


def test_one_run_renders_four_panels(tmp_path, matplotlib):
    run = synthetic_run(tmp_path / "dni-run")
    fig = draw(load_runs([run]))
    try:
        assert len(fig.axes) == 4
        loss, accuracy, sg, rate = fig.axes
        assert colours(loss) == {hex_of(0)} and colours(sg) == {hex_of(0)}
        assert len(accuracy.get_lines()) == 1 and len(accuracy.get_lines()[0].get_xdata()) == 2
        assert sg.get_yscale() == "log"
        assert len(rate.get_lines()) == 4  # source (final only), l1, l2, head
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["dni-run (acc 0.9000)"]
    finally:
        out = save(fig, tmp_path / "out" / "one.png")
    assert out == tmp_path / "out" / "one.png"
    assert is_png(out) == (900, 1400)


def test_two_runs_side_by_side_one_colour_each(tmp_path, matplotlib):
    dni = synthetic_run(tmp_path / "a" / "run", seed=1)
    backprop = synthetic_run(tmp_path / "b" / "run", mode="backprop", stages=("l1", "l2", "l3"),
                             evals=0, seed=2)
    fig = draw(load_runs([dni, backprop]))
    try:
        loss, accuracy, sg, rate = fig.axes
        assert colours(loss) == {hex_of(0), hex_of(1)}
        assert colours(sg) == {hex_of(0)}  # backprop fits no synthesizer
        assert colours(accuracy) == {hex_of(0)}
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert labels == ["a/run (acc 0.9000)", "b/run"]  # same folder names told apart
        nodes = [t.get_text() for t in rate.get_legend().get_texts()]
        assert nodes == ["source", "l1", "l2", "head", "l3"]
    finally:
        out = save(fig, tmp_path / "both.png")
    assert is_png(out) == (900, 1400)


def test_run_without_evals_or_fits_says_what_is_missing(tmp_path, matplotlib):
    run = synthetic_run(tmp_path / "bp", mode="backprop", evals=0)
    source = [{"node": "source", "time": 0.1 + k / 100, "event": "step", "step": k, "seq": k - 1,
               "samples_per_s": [0.0, 250_000.0, 30.0, 60.0, 90.0][k - 1]} for k in range(1, 6)]
    with (run / "source.jsonl").open("a") as f:  # two batches sent in 10 ms, then a wait
        f.write("".join(json.dumps(r) + "\n" for r in source))
    fig = draw(load_runs([run]))
    try:
        _, accuracy, sg, rate = fig.axes
        assert [t.get_text() for t in accuracy.texts] == ["no evaluation records"]
        assert "no synthesizer fits" in sg.texts[0].get_text()
        assert not accuracy.get_lines() and not sg.get_lines()
        assert [t.get_text() for t in rate.texts] == ["early rates up to 250000 clipped"]
        assert rate.get_ylim()[1] < 2000
    finally:
        matplotlib.pyplot.close(fig)


def test_crashed_run_skips_malformed_lines_and_says_so(tmp_path, matplotlib):
    run = synthetic_run(tmp_path / "crashed")
    bad = crash(run)
    log = read_run(run)
    assert log.skipped == bad and log.nodes["l2"].first_skipped == 4
    assert log.unfinished() == ["l2"]
    said = []
    assert is_png(plot_runs([run], tmp_path / "crashed.png", say=said.append))
    assert any(f"skipped {bad} malformed line(s)" in s and "l2.jsonl" in s for s in said), said
    assert any("l2" in s and "without a successful final" in s for s in said), said
    runs = load_runs([run])
    fig = draw(runs)
    matplotlib.pyplot.close(fig)
    label = fig.legends[0].get_texts()[0].get_text()
    assert "unfinished: l2" in label and f"{bad} bad line(s) skipped" in label
    assert notes(runs) == said


def test_nonfinite_values_are_left_out_and_counted(tmp_path, matplotlib):
    run = synthetic_run(tmp_path / "nan")
    with (run / "head.jsonl").open("a") as f:
        f.write(json.dumps({"node": "head", "time": 9.0, "event": "step", "step": 61, "seq": 60,
                            "samples_per_s": 1.0, "loss": float("nan")}) + "\n")
    runs = load_runs([run])
    matplotlib.pyplot.close(draw(runs))
    assert notes(runs) == [f"{run}: 1 non-finite head loss value(s) not drawn"]


def test_cli_defaults_and_errors_name_the_folder(tmp_path, monkeypatch, capsys, matplotlib):
    one = synthetic_run(tmp_path / "one")
    two = synthetic_run(tmp_path / "two", mode="cdni")
    assert default_out([one]) == one / "plot.png"
    assert default_out([one, two]) == Path("runs-compare.png")
    monkeypatch.chdir(tmp_path)
    assert cli(str(one)) == 0 and is_png(one / "plot.png")
    assert cli(str(one), str(two), "--smooth", "1") == 0 and is_png(tmp_path / "runs-compare.png")
    assert capsys.readouterr().out.splitlines() == [f"wrote {one / 'plot.png'}",
                                                    "wrote runs-compare.png"]

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("{}\n")  # the launcher's file alone is no run
    assert cli(str(one), str(empty)) == 2
    assert f"{empty}: no NODE.jsonl files" in capsys.readouterr().err
    assert cli(str(tmp_path / "missing")) == 2
    assert f"{tmp_path / 'missing'}: no such run folder" in capsys.readouterr().err
    assert cli(str(one), "--smooth", "0") == 2
    with pytest.raises(RunFolderError, match="empty"):
        plot_runs([empty], tmp_path / "no.png")


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    run = synthetic_run(tmp_path / "r")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtra, match=r"pip install -e '\.\[bench\]'"):
        plot_runs([run], tmp_path / "r.png")
    assert cli(str(run)) == 1
    assert ".[bench]" in capsys.readouterr().err


def scalar_counts(log_dir: Path) -> dict[str, int]:
    from tensorboard.backend.event_processing import event_accumulator

    events = list(log_dir.glob("events.out.tfevents.*"))
    assert len(events) == 1, events
    reader = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    reader.Reload()
    return {tag: len(reader.Scalars(tag)) for tag in reader.Tags()["scalars"]}


def expected_counts(run_dir: Path) -> dict[str, int]:
    """What the export should write, counted from the NODE.jsonl files themselves."""
    counts: dict[str, int] = {}
    for node in read_run(run_dir).nodes.values():
        for r in node.records:
            keys = {"step": ["loss", "samples_per_s"], "fit": ["sg_loss"],
                    "final": ["samples_per_s"], "epoch": ["epoch", "sent"],
                    "eval": ["test_accuracy", "test_loss", "test_samples", "test_labelled"],
                    }[r["event"]]
            for key in keys:
                if key in r:
                    counts[f"{node.name}/{key}"] = counts.get(f"{node.name}/{key}", 0) + 1
    return counts


def test_tensorboard_export_reads_back(tmp_path, tensorboard):
    from dni_mesh.tensorboard import export

    run = synthetic_run(tmp_path / "tb")
    out = export(run)
    assert out == run / "tensorboard"
    counts = scalar_counts(out)
    assert counts == expected_counts(run)
    assert counts["head/loss"] == 60 and counts["l1/sg_loss"] == 58
    assert counts["head/test_accuracy"] == 2 and counts["source/epoch"] == 2
    assert counts["l1/samples_per_s"] == 61  # every step, and the final rate
    assert scalar_counts(export(run)) == counts  # a second export replaces the first


def test_tensorboard_live_log_and_cli(tmp_path, tensorboard, matplotlib, capsys):
    from dni_mesh.tensorboard import TensorBoardLog

    with TensorBoardLog(tmp_path / "live") as board:  # what the launcher gets per message
        assert board.log("head", {"event": "step", "time": 1.0, "step": 5, "seq": 4,
                                  "samples_per_s": 100.0, "loss": 1.5}) == 2
        assert board.log("head", {"event": "eval", "time": 2.0, "step": 5,
                                  "test_accuracy": 0.75, "status": "ok"}) == 1
        assert board.log("l1", {"event": "fit", "step": 6, "sg_loss": 1e-5,
                                "samples_per_s": 90.0, "ok": True}) == 1
    assert scalar_counts(tmp_path / "live") == {"head/loss": 1, "head/samples_per_s": 1,
                                                "head/test_accuracy": 1, "l1/sg_loss": 1}
    run = synthetic_run(tmp_path / "cli", mode="backprop", evals=0)
    given = tmp_path / "x" / "given.png"
    assert cli(str(run), "--tensorboard", "--out", str(given)) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"TensorBoard event files: {run / 'tensorboard'}", f"wrote {given}"]
    assert scalar_counts(run / "tensorboard") == expected_counts(run) and is_png(given)


def test_missing_tensorboard_names_the_extra(tmp_path, monkeypatch):
    from dni_mesh.tensorboard import export

    run = synthetic_run(tmp_path / "r")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MissingExtra, match=r"pip install -e '\.\[tensorboard\]'"):
        export(run)
    assert not (run / "tensorboard").exists()


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, forkserver):
    """dni on blobs through source -> l1 -> head, 5 batches an epoch, two epochs: 10 steps."""
    from dni_mesh.launch import run
    from dni_mesh.transport import free_port_range

    folder = tmp_path_factory.mktemp("real")
    topology = {
        "name": "plot-real", "mode": "dni", "seed": 3,
        "data": {"source": "nodes.data:Blobs", "batch_size": 32, "epochs": 2, "eval_every": 1,
                 "limit": 5, "args": {"num_samples": 320, "dim": 8, "num_classes": 3}},
        "defaults": {"optimizer": {"name": "adam", "lr": 1e-2}, "window": 2,
                     "synthetic_gradient": {"hidden": 0,
                                            "optimizer": {"name": "adam", "lr": 1e-3}}},
        "nodes": {"source": {"role": "source"},
                  "l1": {"module": "nodes.mlp:Block", "args": {"d_in": 8, "d_out": 16}},
                  "head": {"role": "head", "module": "nodes.mlp:Classifier",
                           "args": {"d_in": 16, "classes": 3}}},
        "edges": ["source -> l1", "l1 -> head"],
        "hosts": {"local": {"address": "127.0.0.1", "base_port": free_port_range(16)}},
    }
    path = folder / "mesh.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    run(path, run_dir=folder / "run", live=False, forkserver=forkserver)
    return folder / "run"


@pytest.mark.timeout(180)
def test_real_run_plots_alone_and_beside_another(real_run, tmp_path, matplotlib):
    log = read_run(real_run)
    assert list(log.nodes) == ["source", "l1", "head"]
    assert log.skipped == 0 and log.unfinished() == []
    assert len(log.nodes["head"].events("eval")) == 2 and log.nodes["l1"].events("fit")
    assert is_png(plot_runs([real_run], real_run / "plot.png")) == (900, 1400)
    other = synthetic_run(tmp_path / "backprop", mode="backprop")
    fig = draw(load_runs([real_run, other]))
    try:
        loss, accuracy, sg, rate = fig.axes
        assert colours(loss) == colours(accuracy) == {hex_of(0), hex_of(1)}
        assert colours(sg) == {hex_of(0)}
        assert len(fig.legends[0].get_texts()) == 2
    except BaseException:
        matplotlib.pyplot.close(fig)
        raise
    assert is_png(save(fig, tmp_path / "side.png")) == (900, 1400)


@pytest.mark.timeout(180)
def test_real_run_exports_to_tensorboard(real_run, tensorboard):
    from dni_mesh.tensorboard import export

    counts = scalar_counts(export(real_run))
    assert counts == expected_counts(real_run)
    assert counts["head/loss"] == 10 and counts["head/test_accuracy"] == 2


def test_standalone_folder_without_nodes_json_and_empty_logs(tmp_path, matplotlib):
    run = synthetic_run(tmp_path / "by-hand")
    (run / "nodes.json").unlink()  # nodes started by hand share a --run-dir, no launcher
    (run / "late.jsonl").write_text("\n\n")  # a node that died before its first record
    log = read_run(run)
    assert sorted(log.nodes) == ["head", "l1", "l2", "late", "source"]
    assert log.unfinished() == ["late"] and log.skipped == 0
    fig = draw(load_runs([run]))
    matplotlib.pyplot.close(fig)
    assert len(fig.axes) == 4
