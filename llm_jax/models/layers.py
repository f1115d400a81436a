"""Building blocks: the precision policy, projections with logical axes, norms, the MLP."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.models.lora import LoRA, NF4Tensor

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """The precision policy: bf16 compute on accelerators; f32 where `auto` meets a CPU.

    CPUs without bf16 units run bf16 matmuls slower than f32, so `auto` keeps f32 there.
    Parameters stay in `param_dtype` (f32 master weights); logits and softmax are f32.
    """
    if cfg.dtype == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return _DTYPES[cfg.dtype]


def param_dtype(cfg: ModelConfig) -> jnp.dtype:
    return _DTYPES[cfg.param_dtype]


class Dense(nn.Module):
    """y = x . W (+ b), contracting the last `n_in` axes of x with the first of W.

    The kernel's shape is `x.shape[-n_in:] + features`, created at that shape (no flattening)
    so that its logical axis names `axes` (inputs first) apply to it as it is. `lora`
    (rank, alpha, dropout) adds a LoRA update; the kernel may be a frozen `NF4Tensor` (QLoRA).
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]
    n_in: int = 1
    use_bias: bool = False
    std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: tuple[int, float, float] | None = None

    @nn.compact
    def __call__(self, x):
        shape = x.shape[-self.n_in :] + self.features
        init = nn.with_logical_partitioning(nn.initializers.normal(self.std), self.axes)
        kernel = self.param("kernel", init, shape, self.param_dtype)
        kernel = kernel.dequantize(self.dtype) if isinstance(kernel, NF4Tensor) else kernel.astype(self.dtype)
        y = _contract(x.astype(self.dtype), kernel, self.n_in)
        if self.use_bias:
            bias_init = nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.n_in :])
            y = y + self.param("bias", bias_init, self.features, self.param_dtype).astype(self.dtype)
        if self.lora is not None:
            y = y + LoRA(*self.lora, axes=self.axes, n_in=self.n_in, features=self.features, dtype=self.dtype,
                         name="lora")(x)
        return y


_KEEP_LEADING_AXES = contextvars.ContextVar("keep_leading_axes", default=False)


@contextlib.contextmanager
def leading_axes_kept():
    """Trace `Dense` as it runs on a multi-device mesh, its input's leading axes kept apart
    (`llm_jax.parallel.planner` reads the [batch, length, ...] shapes of the residuals)."""
    token = _KEEP_LEADING_AXES.set(True)
    try:
        yield
    finally:
        _KEEP_LEADING_AXES.reset(token)


def _contract(x, kernel, n_in: int):
    """x's last n_in axes against the kernel's first n_in; the kernel keeps its created shape.

    Outside a multi-device mesh the leading (batch, length) axes of x are merged into one,
    so that XLA sees a [rows, in...] x [in..., out...] matmul: on XLA:CPU the backward pass
    of the N-D form ran its weight gradients through a slower dot (an MLP block's gradient
    took 2x as long). On a mesh the axes stay apart, so the partitioner keeps the batch and
    length shardings as they are (merging them raised the compiled memory of sharded steps).
    """
    lead = x.shape[: x.ndim - n_in]
    mesh = jax.sharding.get_abstract_mesh()
    merge = len(lead) > 1 and (mesh.empty or mesh.size == 1) and not _KEEP_LEADING_AXES.get()
    if merge:
        x = x.reshape((-1,) + x.shape[x.ndim - n_in :])
    first = x.ndim - n_in
    contract = (tuple(range(first, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
    return y.reshape(lead + y.shape[first:]) if merge else y


def dense(
    cfg: ModelConfig,
    features: int | Sequence[int],
    axes: tuple[str, ...],
    *,
    n_in: int = 1,
    bias: bool | None = None,
    std: float | None = None,
    name: str,
) -> Dense:
    """A `Dense` in the model's precision, with `use_bias` and `init_std` from the config."""
    return Dense(
        features=(features,) if isinstance(features, int) else tuple(features),
        axes=axes,
        n_in=n_in,
        use_bias=cfg.use_bias if bias is None else bias,
        std=cfg.init_std if std is None else std,
        dtype=compute_dtype(cfg),
        param_dtype=param_dtype(cfg),
        lora=(cfg.peft.lora_rank, cfg.peft.lora_alpha, cfg.peft.lora_dropout) if name in cfg.lora_targets() else None,
        name=name,
    )


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last axis, statistics in f32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        x32 = x.astype(jnp.float32)
        if cfg.norm == "layernorm":
            x32 = x32 - x32.mean(-1, keepdims=True)
        x32 = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + cfg.norm_eps)
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],), param_dtype(cfg)
        )
        y = x32 * scale.astype(jnp.float32)
        if cfg.norm == "layernorm" and cfg.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (x.shape[-1],), param_dtype(cfg)
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(compute_dtype(cfg))


_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=True),  # GPT-2's tanh approximation
    # The erf form (as PyTorch computes it): XLA's erf is one rational polynomial, while
    # the erfc that nn.gelu(approximate=False) uses cost ~5x as much in an MLP on XLA:CPU.
    "gelu_exact": lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * (2.0**-0.5)).astype(x.dtype)),
    "relu": nn.relu,
    "silu": nn.silu,
    "swiglu": nn.silu,
    "geglu": lambda x: nn.gelu(x, approximate=True),
}


class MLP(nn.Module):
    """Position-wise feed-forward: act(x W_in) W_out, or act(x W_gate) * (x W_up) W_out when gated."""

    cfg: ModelConfig
    out_std: float

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        act = _ACTIVATIONS[cfg.activation]
        if cfg.gated and self.has_variable("params", "wi_gate_up"):  # joined by `fuse_projections`
            gate_BTF, up_BTF = jnp.split(dense(cfg, 2 * cfg.d_ff, ("embed", "mlp"), name="wi_gate_up")(x_BTD), 2, -1)
            h_BTF = act(gate_BTF) * up_BTF
        else:
            h_BTF = act(dense(cfg, cfg.d_ff, ("embed", "mlp"), name="wi_gate" if cfg.gated else "wi")(x_BTD))
            if cfg.gated:
                h_BTF = h_BTF * dense(cfg, cfg.d_ff, ("embed", "mlp"), name="wi_up")(x_BTD)
        h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "length", "mlp"))
        return dense(cfg, cfg.d_model, ("mlp", "embed"), std=self.out_std, name="wo")(h_BTF)
