"""Position encodings: sinusoidal, rotary (RoPE, with scaling), ALiBi and T5 relative buckets.

Learned absolute positions are an `nn.Embed` in the transformer; everything here is a pure
function of integer positions, so the same code serves training, prefill and decoding.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig


def sinusoidal(positions_BT: jnp.ndarray, d_model: int, max_timescale: float = 10_000.0) -> jnp.ndarray:
    """The fixed encoding of "Attention is all you need": sin on even, cos on odd features."""
    half = d_model // 2
    inv_freq = max_timescale ** (-np.arange(half, dtype=np.float32) / half)
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    out = jnp.zeros(positions_BT.shape + (d_model,), jnp.float32)
    out = out.at[..., 0 : 2 * half : 2].set(jnp.sin(angles_BTF))
    return out.at[..., 1 : 2 * half : 2].set(jnp.cos(angles_BTF))


def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Per-pair rotation frequencies [H/2], after the configured context-extension scaling."""
    head_dim = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if cfg.rope_scaling == "linear":
        # Position interpolation (Chen et al. 2023): every frequency slowed by the factor.
        inv_freq = inv_freq / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        inv_freq = _llama3_scaling(inv_freq, cfg)
    return inv_freq.astype(np.float32)


def _llama3_scaling(inv_freq: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Llama 3.1: slow only the low frequencies, blending smoothly into the unscaled band."""
    factor, lo, hi = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = cfg.rope_original_max_len / lo
    high_freq_wavelen = cfg.rope_original_max_len / hi
    smooth = (cfg.rope_original_max_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(in_band, blended, out)


def apply_rope(x_BTNH: jnp.ndarray, positions_BT: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
    """Rotate feature pairs (i, i + H/2) by position * frequency (the "rotate half" layout)."""
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
    sin = jnp.sin(angles_BTh)[:, :, None, :]
    cos = jnp.cos(angles_BTh)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BTNH.dtype)


def alibi_slopes(n_heads: int) -> np.ndarray:
    """Head-specific slopes of Press et al. (2022), with their rule for non-powers of two."""

    def powers_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return np.asarray(powers_of_two(n_heads), np.float32)
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = powers_of_two(2 * closest)[0::2][: n_heads - closest]
    return np.asarray(powers_of_two(closest) + extra, np.float32)


def alibi_bias(q_pos_BT: jnp.ndarray, k_pos_BS: jnp.ndarray, n_heads: int) -> jnp.ndarray:
    """Linear distance penalty [B, N, T, S]; |distance| so it also serves bidirectional masks."""
    distance_BTS = jnp.abs(q_pos_BT[:, :, None] - k_pos_BS[:, None, :]).astype(jnp.float32)
    return -alibi_slopes(n_heads)[None, :, None, None] * distance_BTS[:, None]


def relative_buckets(relative_BTS: jnp.ndarray, bidirectional: bool, n_buckets: int, max_distance: int) -> jnp.ndarray:
    """T5's bucketing of key - query offsets: exact for small offsets, logarithmic beyond."""
    bucket = jnp.zeros_like(relative_BTS)
    n = n_buckets
    if bidirectional:
        n //= 2
        bucket += (relative_BTS > 0).astype(relative_BTS.dtype) * n
        distance = jnp.abs(relative_BTS)
    else:
        distance = jnp.maximum(-relative_BTS, 0)
    max_exact = n // 2
    is_small = distance < max_exact
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (n - max_exact)).astype(relative_BTS.dtype)
    large = jnp.minimum(large, n - 1)
    return bucket + jnp.where(is_small, distance, large)
