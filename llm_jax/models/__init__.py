"""The Transformer model family.

Shape letters, used in variable names (`x_BTD`) and einsum strings throughout:

    B batch          T query length     S key length (cache size when decoding)
    D model width    F MLP hidden       V vocabulary
    N query heads    K key/value heads  G query heads per kv head (N // K)
    H head dim       L layers

Logical axis names carried by every parameter: `embed, mlp, heads, kv_heads, head_dim,
vocab, layers`; activations are constrained on `batch, length, embed` (and `heads`,
`vocab` where they matter). One rules table in `llm_jax.parallel` maps them onto a mesh.
"""

from llm_jax.models.attention import KVCache, LayerKVCache
from llm_jax.models.transformer import (
    Transformer,
    abstract_params,
    can_unstack_layer_params,
    count_params,
    fuse_projections,
    has_joinable_projections,
    init_params,
    param_logical_axes,
    param_shapes,
    stack_layer_params,
    unstack_layer_params,
)

__all__ = [
    "KVCache",
    "LayerKVCache",
    "Transformer",
    "abstract_params",
    "can_unstack_layer_params",
    "count_params",
    "fuse_projections",
    "has_joinable_projections",
    "init_params",
    "param_logical_axes",
    "param_shapes",
    "stack_layer_params",
    "unstack_layer_params",
]
