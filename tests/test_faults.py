"""End-to-end faults with real node processes: a run stopped by SIGINT and continued with
`dni-mesh run --resume` ends exactly where the same run uninterrupted ends (window 1: every
node resumes from the same cut, so nothing differs), and what cannot be resumed is refused."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import dni_mesh
from test_mesh import DATA, chain, wait_for, write

pytestmark = pytest.mark.skipif(not (DATA / "mnist").is_dir(),
                                reason=f"MNIST not found under {DATA} (set DNI_MESH_DATA)")


def slow_chain() -> dict:
    """Long enough (a 6 ms link on every edge: at least 12 ms a step) to be interrupted after its
    first checkpoints, however fast the machine."""
    topology = chain("dni")
    topology["data"].update(epochs=2, limit=None, eval_every=1, batch_size=32,
                            args={"limit": 2048})
    topology["checkpoint"] = {"every": 16}
    topology["links"] = {"default": {"delay_ms": 6}}
    return topology


def cli(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dni_mesh.cli", *arguments], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, forkserver) -> tuple[Path, Path, dict]:
    """The slow chain run without interruption, once for the file: its topology file, its run
    folder (with every node's checkpoints) and its summary."""
    folder = tmp_path_factory.mktemp("whole")
    path = write(folder, slow_chain())
    summary = dni_mesh.run(path, run_dir=folder / "run", quiet=True, forkserver=forkserver)
    return path, folder / "run", summary


@pytest.mark.timeout(300)
def test_a_run_interrupted_and_resumed_ends_as_the_uninterrupted_run(tmp_path, whole):
    path, _, whole = whole
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "dni_mesh.cli", "run", str(path),
                                 "--run-dir", str(run_dir), "--no-live"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (run_dir / "head.ckpt").exists(), 120, "the head's first checkpoint")
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=60) == 130, launcher.stdout.read()
    finally:
        launcher.kill()
    steps = [json.loads(line) for line in (run_dir / "head.jsonl").read_text().splitlines()]
    stopped_at = max(r["step"] for r in steps if r["event"] == "step")
    assert stopped_at < whole["nodes"]["head"]["steps"]  # it was stopped mid-run

    resumed = cli("run", "--resume", str(run_dir), "--no-live", "--summary",
                  str(tmp_path / "summary.json"))
    assert resumed.returncode == 0, resumed.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(whole["test_accuracy"], abs=1e-9)
    assert summary["nodes"]["head"]["steps"] == whole["nodes"]["head"]["steps"]
    records = [json.loads(line) for line in (run_dir / "head.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["event"] == "final"]) == 2  # one log, both parts


@pytest.mark.timeout(300)
def test_resume_refuses_a_folder_without_checkpoints_and_shape_changes(tmp_path, whole):
    path, saved, _ = whole
    shutil.copytree(saved, tmp_path / "run")
    for checkpoint in (tmp_path / "run").glob("*.ckpt"):
        checkpoint.unlink()
    refused = cli("run", "--resume", str(tmp_path / "run"))
    assert refused.returncode == 2
    assert "cannot resume" in refused.stdout and "no checkpoint of source, l1, l2, head" in refused.stdout

    changed = cli("run", "--resume", str(saved), "--set", "nodes.l1.args.d_out=31",
                  "--set", "nodes.l2.args.d_in=31")
    assert changed.returncode == 2
    assert "a resumed run keeps its shapes" in changed.stdout, changed.stdout
    both = cli("run", str(path), "--resume", str(saved))
    assert both.returncode == 2 and "not both" not in both.stdout and "--resume RUN_DIR" in both.stdout


@pytest.mark.timeout(300)
def test_a_hand_started_node_killed_and_restarted_with_rejoin_lets_the_mesh_finish(tmp_path):
    """Nodes started as `dni-mesh node` with no launcher: l2 is killed mid-run and started again
    with --rejoin; it resumes from its checkpoint, its neighbours expire what was in flight,
    and every node reaches the end of the data and exits 0."""
    topology = slow_chain()
    topology["defaults"]["window"] = 3
    path = write(tmp_path, topology)
    run_dir = tmp_path / "run"

    def start(name: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "dni_mesh.cli", "node", str(path), "--name",
                                 name, "--run-dir", str(run_dir), "--stall-timeout", "60", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    nodes = {name: start(name) for name in topology["nodes"]}
    try:
        wait_for(lambda: (run_dir / "l2.ckpt").exists(), 120, "l2's first checkpoint")
        nodes["l2"].kill()
        nodes["l2"].wait(timeout=30)
        nodes["l2"] = start("l2", "--rejoin")
        codes = {name: process.wait(timeout=200) for name, process in nodes.items()}
    finally:
        for process in nodes.values():
            process.kill()
    output = {name: process.stdout.read() for name, process in nodes.items()}
    assert all(code == 0 for code in codes.values()), output
    assert "rejoined" in output["l2"] and "peer_rejoined" not in output["l2"], output["l2"]
    records = [json.loads(line) for line in (run_dir / "l1.jsonl").read_text().splitlines()]
    assert [r["peer"] for r in records if r["event"] == "peer_rejoined"] == ["l2"]
    final = [r for r in records if r["event"] == "final"][-1]
    assert final["status"] == "done" and final["expired"] >= 0
