"""Meshes and the logical-axis rules that place parameters and activations on them."""

from llm_jax.parallel.mesh import MESH_AXES, make_mesh, mesh_shape
from llm_jax.parallel.rules import DEFAULT_RULES, init_sharded_params, param_shardings, sharding_context

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "init_sharded_params",
    "make_mesh",
    "mesh_shape",
    "param_shardings",
    "sharding_context",
]
