"""The launcher's live view as a log reader sees it: plain text, never cut to a width."""
import io
from types import SimpleNamespace

from rich.console import Console

from dni_mesh.live import LiveView, plain_table


def test_the_final_table_is_plain_and_whole_when_not_on_a_terminal(capsys):
    topology = SimpleNamespace(name="t", source="source", heads=["head"], data=SimpleNamespace(epochs=2),
                               nodes={"source": SimpleNamespace(role="source"),
                                      "a-node-with-a-very-long-name-indeed": SimpleNamespace(role="stage"),
                                      "head": SimpleNamespace(role="head")})
    node = lambda pid, **latest: SimpleNamespace(process=SimpleNamespace(pid=pid), latest=latest,  # noqa: E731
                                                 final={"status": "done"}, evals=[])
    nodes = {"source": node(1, step=10, samples_per_s=1234.5),
             "a-node-with-a-very-long-name-indeed": node(2, step=10, sg_loss=0.001234),
             "head": node(3, step=10, loss=0.5)}
    nodes["head"].evals = [{"test_accuracy": 0.975, "test_loss": 0.08}]
    view = LiveView(topology, console=Console(file=io.StringIO(), width=40))
    view.final_table(nodes, {"mode": "dni", "test_accuracy": 0.975, "train_samples_per_s": 1000.0,
                             "wall_s": 12.5, "run_dir": "runs/x"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "dni-mesh: t finished" and lines[1].split() == [
        "node", "role", "pid", "step", "loss", "sg_loss", "samples/s", "test", "acc", "status"]
    row = next(line for line in lines if line.startswith("a-node"))
    assert row.split() == ["a-node-with-a-very-long-name-indeed", "stage", "2", "10", "-", "0.001234",
                           "-", "-", "done"]
    assert "1234" in next(line for line in lines if line.startswith("source"))


def test_quiet_prints_nothing(capsys):
    topology = SimpleNamespace(name="t", source="source", heads=[], data=SimpleNamespace(epochs=1), nodes={})
    view = LiveView(topology, quiet=True, console=Console(file=io.StringIO()))
    view.refresh({})
    view.final_table({}, {"mode": "dni", "test_accuracy": None, "train_samples_per_s": None,
                          "wall_s": 1.0, "run_dir": "r"})
    assert capsys.readouterr().out == "" and view.console.file.getvalue() == ""


def test_plain_table_aligns_columns_to_the_widest_cell():
    assert plain_table("T", [["a", "bb"], ["ccc", "d"]]).splitlines() == ["T", "a    bb", "ccc  d"]
