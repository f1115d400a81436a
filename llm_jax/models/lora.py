"""LoRA updates of a projection, and the NF4-quantized frozen weights QLoRA trains them on.

LoRA (Hu et al., 2021) adds a rank-r update to a frozen kernel W:

    y = x W + (alpha / r) * (x A) B        A: [in..., r] random,  B: [r, out...] zeros

so a fresh update is exactly zero and the model starts where the base left off. The
factors carry the kernel's logical axes on their in / out sides (the rank axis is never
split), so the rules table shards them like the kernel they adapt.

QLoRA (Dettmers et al., 2023) keeps the frozen kernel as 4-bit NF4 codes: sixteen levels
at the quantiles of a normal distribution, scaled by the absolute maximum of each group
of `group_size` weights along the contraction axis. `Dense` dequantizes an `NF4Tensor`
kernel inside the layer, so under the layer scan only one layer's weights are ever in
full precision at a time.
"""

from __future__ import annotations

import statistics

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


class LoRA(nn.Module):
    """The low-rank update (alpha / r) x A B of a `Dense` with kernel axes `axes`."""

    rank: int
    alpha: float
    dropout: float
    axes: tuple  # the adapted kernel's logical axes, inputs first
    n_in: int
    features: tuple[int, ...]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[-self.n_in :]
        fan_in = int(np.prod(in_shape))
        # Factors are f32 whatever the base's precision: they are all that trains.
        a = self.param("a", nn.with_logical_partitioning(nn.initializers.normal(fan_in**-0.5), self.axes[: self.n_in] + (None,)),
                       in_shape + (self.rank,), jnp.float32)
        b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, (None,) + self.axes[self.n_in :]),
                       (self.rank,) + self.features, jnp.float32)
        # Dropout on the update's input only (the LoRA paper's choice); it needs a "dropout"
        # rng, which the fine-tuning step passes when training and nothing else does.
        if self.dropout > 0 and self.has_rng("dropout"):
            x = nn.Dropout(self.dropout, deterministic=False)(x)
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        h = jax.lax.dot_general(x.astype(self.dtype), a.astype(self.dtype), (contract, ((), ())))
        y = jax.lax.dot_general(h, b.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
        return y * (self.alpha / self.rank)


def lora_delta(a: jax.Array, b: jax.Array, kernel_ndim: int, scale: float) -> jax.Array:
    """scale * A B shaped like the kernel, for factors with any leading (layer) axes."""
    lead = a.ndim + b.ndim - 2 - kernel_ndim
    product = lambda a, b: jnp.tensordot(a, b, axes=1)  # noqa: E731  [in..., r] x [r, out...]
    for _ in range(lead):
        product = jax.vmap(product)
    return scale * product(a.astype(jnp.float32), b.astype(jnp.float32))


# ------------------------------------------------------------------------------ NF4


def _nf4_levels() -> np.ndarray:
    """Sixteen levels in [-1, 1] holding equal probability mass of a normal distribution.

    Eight positive and seven negative quantiles plus an exact zero (so zero weights stay
    zero), scaled so the outermost level is +-1. The extreme quantiles come from
    probabilities slightly inside (0, 1) so that they stay finite.
    """
    normal = statistics.NormalDist()
    outer = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))  # between the 15- and 16-level end points
    positive = [normal.inv_cdf(p) for p in np.linspace(outer, 0.5, 9)[:-1]]
    negative = [-normal.inv_cdf(p) for p in np.linspace(outer, 0.5, 8)[:-1]]
    levels = np.sort(np.array(positive + [0.0] + negative))
    return (levels / np.abs(levels).max()).astype(np.float32)


NF4_LEVELS = _nf4_levels()
# The widest gap between neighbouring levels bounds the rounding error: half of it, times
# the group's absolute maximum.
NF4_MAX_ERROR = float(np.diff(NF4_LEVELS).max() / 2)


@flax.struct.dataclass
class NF4Tensor:
    """A weight as 4-bit NF4 codes with one f32 absmax scale per group of the contraction axis.

    codes: the weight's own shape, indices into `NF4_LEVELS` (uint4). Keeping the shape is
           what lets flax check it against the kernel it replaces, and lets the layer scan
           slice a leading `layers` axis off codes and scale alike.
    scale: the weight's shape with the contraction axis shortened to its number of groups.
    axis:  the contraction axis, counted from the end (unchanged by slicing leading axes).
    """

    codes: jax.Array
    scale: jax.Array
    axis: int = flax.struct.field(pytree_node=False)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        values = jnp.asarray(NF4_LEVELS)[self.codes.astype(jnp.int32)]
        group = self.codes.shape[self.axis] // self.scale.shape[self.axis]
        return (values * jnp.repeat(self.scale, group, axis=self.axis)).astype(dtype)

    def __getitem__(self, index: int) -> "NF4Tensor":
        """Slice `index` of the leading axis: one layer of a stacked weight (`unstack_layer_params`)."""
        if (self.axis % self.codes.ndim) == 0:
            raise ValueError("an NF4Tensor contracted over its leading axis has no slices along it")
        return NF4Tensor(codes=self.codes[index], scale=self.scale[index], axis=self.axis)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        return self.codes.size // 2 + self.scale.nbytes


def quantize_nf4(w: jax.Array, axis: int, group_size: int) -> NF4Tensor:
    """NF4 codes of `w` with absmax scales per `group_size` slice of `axis` (or per channel if shorter)."""
    axis = axis % w.ndim - w.ndim
    width = w.shape[axis]
    group = min(group_size, width)
    if width % group:
        raise ValueError(f"qlora group size {group_size} does not divide the contraction size {width} of a "
                         f"{tuple(w.shape)} weight; choose a model.peft.qlora_group_size that divides it")
    w_last = jnp.moveaxis(w.astype(jnp.float32), axis, -1)
    grouped = w_last.reshape(w_last.shape[:-1] + (width // group, group))
    scale = jnp.maximum(jnp.abs(grouped).max(axis=-1, keepdims=True), 1e-12)
    nearest = jnp.abs((grouped / scale)[..., None] - jnp.asarray(NF4_LEVELS)).argmin(axis=-1)
    codes = jnp.moveaxis(nearest.reshape(w_last.shape), -1, axis).astype(jnp.uint4)
    return NF4Tensor(codes=codes, scale=jnp.moveaxis(scale[..., 0], -1, axis), axis=axis)
