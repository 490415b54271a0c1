"""The fork server on its own: a forked `dni-mesh` command gets its own output, folder and
environment, and its exit code (or the signal that ended it) comes back to the launcher.
Meshes started through it are tested end to end in test_mesh.py."""

import os
import signal
import subprocess

import pytest

from dni_mesh.forkserver import ForkServer, ForkServerFailed, node_environment
from dni_mesh.transport import free_port_range


@pytest.fixture(scope="module")
def server():
    server = ForkServer(node_environment())
    yield server
    server.close()


@pytest.mark.timeout(120)
def test_a_forked_command_runs_in_its_folder_with_its_environment_and_exit_code(server, tmp_path):
    (tmp_path / "mesh.yaml").write_text("name: [unclosed\n")
    log = tmp_path / "out.log"
    env = {**node_environment(), "DNI_MESH_MARK": "forked"}
    process = server.start(["validate", "mesh.yaml"], env, log, tmp_path)  # relative to cwd
    assert process.wait(timeout=60) == 2
    assert process.poll() == 2
    text = log.read_text()
    assert "invalid topology" in text and "mesh.yaml" in text, text


@pytest.mark.timeout(120)
def test_a_killed_node_reports_the_signal_and_can_be_killed_by_its_group(server, tmp_path):
    (tmp_path / "mesh.yaml").write_text(
        "name: wait\ndata: {source: mnist, batch_size: 8, epochs: 1}\n"
        "nodes:\n  source: {role: source}\n"
        "  head: {role: head, module: 'nodes.mlp:Classifier', args: {d_in: 784, classes: 10}}\n"
        "edges: ['source -> head']\n"
        f"hosts: {{local: {{address: 127.0.0.1, base_port: {free_port_range(2)}}}}}\n")
    process = server.start(["node", "mesh.yaml", "--name", "head", "--stall-timeout", "300",
                            "--run-dir", str(tmp_path / "run")], node_environment(),
                           tmp_path / "head.log", tmp_path)
    assert process.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=0.5)
    assert os.getpgid(process.pid) == process.pid  # its own group, as the launcher kills it
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


@pytest.mark.timeout(60)
def test_a_dead_server_is_an_error_not_a_hang(tmp_path):
    server = ForkServer(node_environment())
    server.process.kill()
    for _ in range(2):  # and so is every later start (a restart asks the same server)
        with pytest.raises(ForkServerFailed, match="fork server .* exited with code -9"):
            server.start(["validate", "x.yaml"], node_environment(), tmp_path / "log", tmp_path)
    server.close()
