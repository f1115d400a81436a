"""Model configurations of published architectures, for the experiment files to build on.

Each function returns a `ModelConfig` matching the published model's shapes, so that its
parameter count matches the published checkpoint (checked by `tests/test_presets.py`).
"""

from __future__ import annotations

from llm_jax.config import ModelConfig


def gpt2(d_model: int, n_layers: int, n_heads: int, **overrides) -> ModelConfig:
    """GPT-2 (Radford et al. 2019): learned positions, LayerNorm, GELU, biases, tied output."""
    fields = dict(
        vocab_size=50257,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        d_ff=4 * d_model,
        max_seq_len=1024,
        position="learned",
        norm="layernorm",
        activation="gelu",
        tie_embeddings=True,
        use_bias=True,
        dropout=0.1,
    )
    return ModelConfig(**{**fields, **overrides})


def llama(
    d_model: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    d_ff: int,
    vocab_size: int,
    max_seq_len: int,
    rope_theta: float = 10_000.0,
    **overrides,
) -> ModelConfig:
    """Llama family (also Mistral): RoPE, RMSNorm, SwiGLU, no biases, untied output."""
    fields = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        d_ff=d_ff,
        max_seq_len=max_seq_len,
        position="rope",
        rope_theta=rope_theta,
        norm="rmsnorm",
        norm_eps=1e-5,
        activation="swiglu",
        tie_embeddings=False,
        use_bias=False,
    )
    return ModelConfig(**{**fields, **overrides})
