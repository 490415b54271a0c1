"""Fixtures shared by the test files."""

import pytest

from dni_mesh.forkserver import ForkServer, node_environment


@pytest.fixture(scope="session")
def forkserver():
    """One fork server for every mesh a test runs in this process with `dni_mesh.run(...,
    forkserver=forkserver)`: torch is imported once for the session instead of once a run (as
    `dni-mesh bench` does for its grid). Nodes are still real processes, forked from it; the
    tests of the fork server itself, of `--start exec` and of the CLI start their own."""
    server = ForkServer(node_environment())
    yield server
    server.close()
