"""One table maps the model's logical axis names onto mesh axes.

    batch -> (data, fsdp)   embed -> fsdp (ZeRO-3 / FSDP)   heads, kv_heads, mlp, vocab -> tensor
    layers -> pipeline

Tensor parallelism is then Megatron-style: q/k/v and the MLP input are split by output
columns, the attention output and MLP output by input rows, and the vocabulary is split
for the embedding and the logits.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax

from llm_jax.config import ModelConfig
from llm_jax.models import abstract_params, init_params, param_logical_axes

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", "pipeline"),  # each pipeline stage holds its own slice of the layer stack
)


def _mesh_spec(name: str, logical: jax.sharding.PartitionSpec, shape, mesh, rules) -> jax.sharding.PartitionSpec:
    """The mesh PartitionSpec of one parameter, refusing specs that cannot work."""
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    used = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
    if len(used) != len(set(used)):
        raise ValueError(f"rules map two axes of {name} {tuple(logical)} onto the same mesh axis: {tuple(spec)}")
    for dim, logical_name, entry in zip(shape, logical, spec):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else entry)
        ways = math.prod(mesh.shape[a] for a in axes)
        if dim % ways:
            raise ValueError(
                f"{name}: axis {logical_name!r} of size {dim} cannot be split {ways} ways over mesh axes {axes}; "
                f"choose mesh sizes that divide {dim}"
            )
    return spec


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """A NamedSharding for every parameter, shaped like the params."""
    shapes = abstract_params(cfg)
    logical = param_logical_axes(cfg)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731

    def one(path, shape, spec):
        mesh_spec = _mesh_spec(jax.tree_util.keystr(path), spec, shape.shape, mesh, rules)
        return jax.sharding.NamedSharding(mesh, mesh_spec)

    return jax.tree_util.tree_map_with_path(one, shapes, logical, is_leaf=lambda x: is_spec(x))


def init_sharded_params(cfg: ModelConfig, mesh: jax.sharding.Mesh, rng: jax.Array, rules=DEFAULT_RULES):
    """Initialise parameters directly into their shardings: none is ever whole on one device."""
    shardings = param_shardings(cfg, mesh, rules)
    return jax.jit(lambda key: init_params(cfg, key), out_shardings=shardings)(rng)


@contextlib.contextmanager
def sharding_context(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """Make the mesh and rules current, so the model's activation constraints apply."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
