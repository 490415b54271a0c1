"""The node catalogue: plain torch modules and data sources that topologies name by import path
(for example `nodes.mlp:Block`). They know nothing of the mesh; keep your own nodes the same way.
"""
