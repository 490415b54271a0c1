"""dni_mesh: Decoupled Neural Interfaces as a mesh of real processes talking over ZeroMQ.

Kept import-light on purpose: import the submodules you need (e.g. `dni_mesh.wire`); `run`
and `resume` import the launcher only when called.
"""

__version__ = "0.1.0"


def run(topology, overrides=(), **options) -> dict:
    """Run a mesh on this machine and return its summary: `dni_mesh.launch.run`, whose
    docstring lists the options (`run_dir`, `summary_path`, `quiet`, `stall_s`, ...)."""
    from dni_mesh.launch import run as launch_run
    return launch_run(topology, overrides, **options)


def resume(run_dir, overrides=(), **options) -> dict:
    """Continue a stopped or failed run from its checkpoints: `dni_mesh.launch.resume`."""
    from dni_mesh.launch import resume as launch_resume
    return launch_resume(run_dir, overrides, **options)
