"""Weight-only int8 / int4 quantization with per-channel or per-group scales.

Each matrix is quantized symmetrically along its contraction axis (the axis a matmul sums
over), so every output channel, or every `group_size` slice of one, gets its own scale.
Which axis that is comes from the parameter's logical axis names, not from its path.
Norm scales and biases stay in full precision.

Quantized parameters are stored as `QuantizedTensor`s and turned back into the compute
dtype inside the jitted decoding step (`dequantize_params`), so the weights rest in
memory at 8 or 4 bits.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.models import param_logical_axes

_QMAX = {8: 127, 4: 7}
_STORAGE = {8: jnp.int8, 4: jnp.int4}


@flax.struct.dataclass
class QuantizedTensor:
    """Integers [..., groups, group] and f32 scales [..., groups, 1], contraction axis last."""

    values: jax.Array
    scale: jax.Array
    axis: int = flax.struct.field(pytree_node=False)  # contraction axis in the original shape
    shape: tuple = flax.struct.field(pytree_node=False)  # the original shape

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        w = self.values.astype(jnp.float32) * self.scale
        moved = tuple(np.delete(np.array(self.shape), self.axis)) + (self.shape[self.axis],)
        return jnp.moveaxis(w.reshape(moved), -1, self.axis).astype(dtype)

    def __getitem__(self, index: int) -> "QuantizedTensor":
        """Slice `index` of the leading axis: one layer of a stacked weight (`unstack_layer_params`)."""
        if self.axis == 0:
            raise ValueError("a QuantizedTensor contracted over its leading axis has no slices along it")
        return QuantizedTensor(values=self.values[index], scale=self.scale[index], axis=self.axis - 1,
                               shape=self.shape[1:])

    @property
    def nbytes(self) -> int:
        bits = 4 if self.values.dtype == jnp.int4 else 8
        return self.values.size * bits // 8 + self.scale.nbytes


def _check_options(bits, group_size) -> None:
    if bits not in _QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None (one scale per channel), got {group_size!r}")


def quantize_tensor(w: jax.Array, bits: int, axis: int, group_size: int | None = None) -> QuantizedTensor:
    _check_options(bits, group_size)
    axis = axis % w.ndim
    width = w.shape[axis]
    # A group never spans more than the axis: a short axis gets one scale per channel.
    group = width if group_size is None else min(group_size, width)
    if width % group:
        raise ValueError(f"group_size={group_size} does not divide the contraction size {width}")
    w_last = jnp.moveaxis(w.astype(jnp.float32), axis, -1)
    grouped = w_last.reshape(w_last.shape[:-1] + (width // group, group))
    scale = jnp.maximum(jnp.abs(grouped).max(axis=-1, keepdims=True), 1e-12) / _QMAX[bits]
    q = jnp.clip(jnp.round(grouped / scale), -_QMAX[bits], _QMAX[bits]).astype(_STORAGE[bits])
    return QuantizedTensor(values=q, scale=scale, axis=axis, shape=tuple(w.shape))


def contraction_axis(names: tuple) -> int | None:
    """The axis a parameter's matmul sums over, from its logical names; None: do not quantize.

    Projections list input axes before output axes, so `embed` first means the input is
    the model width (q/k/v, MLP in, unembedding); `embed` last means it is the output and
    the contraction is the axis before it (MLP out: `mlp`; attention out: `head_dim`).
    Embedding tables are looked up by row, and as tied output layers contract `embed`.
    """
    core = tuple(n for n in names if n != "layers")
    offset = len(names) - len(core)
    if len(core) < 2 or "embed" not in core:
        return None
    if core[0] in ("vocab", None) or core[0] == "embed":
        return offset + core.index("embed")
    return offset + len(core) - 2


def quantize_params(params, cfg: ModelConfig, bits: int = 8, group_size: int | None = None):
    """Quantize every matrix of `params`.

    `group_size` None gives one scale per output channel; otherwise one per `group_size`
    slice of the contraction axis (an axis shorter than that gets one per channel).
    """
    _check_options(bits, group_size)
    axes = param_logical_axes(cfg)
    flat_axes = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))

    def quantize(path, w):
        axis = contraction_axis(tuple(flat_axes[path]))
        if axis is None:
            return w
        if group_size is not None and w.shape[axis] > group_size and w.shape[axis] % group_size:
            name = jax.tree_util.keystr(path)
            raise ValueError(f"group_size={group_size} does not divide {name}'s contraction size {w.shape[axis]}")
        return quantize_tensor(w, bits, axis, group_size)

    return jax.tree_util.tree_map_with_path(quantize, params)


def _is_quantized(x) -> bool:
    return isinstance(x, QuantizedTensor)


def dequantize_params(params, dtype=jnp.float32):
    """Plain arrays back from `quantize_params` output; plain arrays pass through unchanged."""
    return jax.tree.map(lambda x: x.dequantize(dtype) if _is_quantized(x) else x, params, is_leaf=_is_quantized)


def params_nbytes(params) -> int:
    leaves = jax.tree.leaves(params, is_leaf=_is_quantized)
    return sum(x.nbytes for x in leaves)
