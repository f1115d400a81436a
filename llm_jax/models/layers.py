"""Building blocks: the precision policy, projections with logical axes, norms, the MLP."""

from __future__ import annotations

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
        # Contracted as created, not reshaped to one 2-D matmul: the 2-D form is faster on
        # XLA:CPU but raised the compiled memory of sharded train steps (tests/test_planner.py).
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))
        if self.use_bias:
            bias_init = nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.n_in :])
            y = y + self.param("bias", bias_init, self.features, self.param_dtype).astype(self.dtype)
        if self.lora is not None:
            y = y + LoRA(*self.lora, axes=self.axes, n_in=self.n_in, features=self.features, dtype=self.dtype,
                         name="lora")(x)
        return y


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
    "gelu_exact": lambda x: nn.gelu(x, approximate=False),
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
        h_BTF = act(dense(cfg, cfg.d_ff, ("embed", "mlp"), name="wi_gate" if cfg.gated else "wi")(x_BTD))
        if cfg.gated:
            h_BTF = h_BTF * dense(cfg, cfg.d_ff, ("embed", "mlp"), name="wi_up")(x_BTD)
        h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "length", "mlp"))
        return dense(cfg, cfg.d_model, ("mlp", "embed"), std=self.out_std, name="wo")(h_BTF)
