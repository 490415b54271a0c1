"""dni_mesh: Decoupled Neural Interfaces as a mesh of real processes talking over ZeroMQ.

Kept import-light on purpose: import the submodules you need (e.g. `dni_mesh.wire`).
"""

__version__ = "0.1.0"
