"""Scale-out: device mesh, FSDP2/HSDP, tensor parallel, activation checkpointing, compile, fp8.

``parallelize(model, cfg, mesh)`` is the one entry point the trainer calls; see README.md.
"""

from kfm.parallel.mesh import build_mesh, dp_mesh, dp_rank_size, mesh_shape
from kfm.parallel.parallelize import parallelize

__all__ = ["build_mesh", "dp_mesh", "dp_rank_size", "mesh_shape", "parallelize"]
