"""Parameter-efficient tuning inside the model, switched on by `model.peft.method`.

With `method="none"` nothing here runs and the model's parameters and outputs are exactly
the base model's. Every method starts as the identity (the tuned model's outputs equal the
base model's at initialisation):

    lora, qlora    `llm_jax.models.lora`: a zero-initialised low-rank update per target projection
    adapter        x + up(gelu(down(x))) after attention and after the MLP, `up` zero-initialised
                   (Houlsby et al., 2019)
    prefix         per-layer trained keys/values from an embedding through an MLP (Li & Liang, 2021)
    ptuning_v2     per-layer trained keys/values, directly (Liu et al., 2022)
    prompt         `n_virtual` trained input embeddings ahead of the tokens (Lester et al., 2021)
    ptuning        the same, produced by a small prompt-encoder MLP (Liu et al., 2021)

Keys/values that are not tokens (prefixes, and the soft prompt's rows at every layer) are
attended in a softmax of their own, added to the tokens' attention through a per-head gate
that starts at zero (the zero-init attention of LLaMA-Adapter): the joint softmax of the
original prefix tuning can never be exactly neutral, because any extra key takes weight.

Soft-prompt rows sit at positions -P..-1, before every sequence (and every packed document),
so the tokens keep their positions. They are recomputed in every forward pass, decoding
steps included (P extra rows per step), and never enter the KV cache: cache slot s still
holds the token at position s, and prefill, decoding and a full forward pass all agree.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.models import positions as pos_lib
from llm_jax.models.layers import Dense, dense

# Parameter-tree names that belong to a PEFT method: exactly these train, all else is frozen.
TUNED_NAMES = ("lora", "adapter_attention", "adapter_mlp", "prefix", "soft_prompt")
KV_PREFIX_METHODS = ("prefix", "ptuning_v2")
PROMPT_METHODS = ("prompt", "ptuning")


def prompt_rows(cfg: ModelConfig) -> int:
    """How many soft-prompt rows lead the sequence inside the model (0 without prompt tuning)."""
    return cfg.peft.n_virtual if cfg.peft.method in PROMPT_METHODS else 0


def attends_prefix(cfg: ModelConfig) -> bool:
    return cfg.peft.method in KV_PREFIX_METHODS + PROMPT_METHODS


def is_tuned(path) -> bool:
    """Whether the parameter at `path` (a key path) belongs to the model's PEFT method."""
    return any(getattr(k, "key", k) in TUNED_NAMES for k in path)


class Adapter(nn.Module):
    """A residual bottleneck; the up-projection starts at zero, so a new adapter is the identity."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        h = dense(self.cfg, cfg.peft.adapter_dim, ("embed", None), bias=True, name="down")(x_BTD)
        h = nn.gelu(h, approximate=True)
        return x_BTD + dense(cfg, cfg.d_model, (None, "embed"), bias=True, std=0.0, name="up")(h)


class Reparameterization(nn.Module):
    """The small two-layer tanh MLP of prefix tuning and P-tuning (trained, then only its output matters)."""

    hidden: int
    out: int

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(Dense((self.hidden,), (None, None), use_bias=True, std=x.shape[-1] ** -0.5, name="hidden")(x))
        return Dense((self.out,), (None, None), use_bias=True, std=self.hidden**-0.5, name="out")(h)


class SoftPrompt(nn.Module):
    """Prompt tuning / P-tuning: `n_virtual` embeddings placed ahead of every row of `x`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        P = cfg.peft.n_virtual
        init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), (None, "embed"))
        prompt_PD = self.param("embedding", init, (P, cfg.d_model), jnp.float32)
        if cfg.peft.method == "ptuning":
            prompt_PD = prompt_PD + Reparameterization(cfg.peft.encoder_hidden, cfg.d_model, name="encoder")(prompt_PD)
        prompt_BPD = jnp.broadcast_to(prompt_PD.astype(x_BTD.dtype), (x_BTD.shape[0],) + prompt_PD.shape)
        return jnp.concatenate([prompt_BPD, x_BTD], axis=1)


def split_prompt(cfg: ModelConfig, q_BTNH, k_BTKH, v_BTKH):
    """Take the soft-prompt rows off the projections: (q, k, v of the tokens, prompt or None).

    The prompt's queries and keys are rotated (RoPE) at positions -P..-1 here; the tokens'
    are rotated by the caller at their own positions.
    """
    P = prompt_rows(cfg)
    if not P:
        return q_BTNH, k_BTKH, v_BTKH, None
    q_BPNH, k_BPKH, v_BPKH = q_BTNH[:, :P], k_BTKH[:, :P], v_BTKH[:, :P]
    if cfg.position == "rope":
        pos_BP = jnp.broadcast_to(jnp.arange(-P, 0), q_BPNH.shape[:2])
        inv_freq = pos_lib.rope_inverse_frequencies(cfg)
        q_BPNH, k_BPKH = pos_lib.apply_rope(q_BPNH, pos_BP, inv_freq), pos_lib.apply_rope(k_BPKH, pos_BP, inv_freq)
    return q_BTNH[:, P:], k_BTKH[:, P:], v_BTKH[:, P:], (q_BPNH, k_BPKH, v_BPKH)


def _attend_all(q_BTNH, k_BPKH, v_BPKH, causal: bool = False):
    """Softmax attention of the queries over a short key set (grouped heads, f32 scores)."""
    B, T, N, H = q_BTNH.shape
    K = k_BPKH.shape[2]
    q = q_BTNH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bpkh->bkgtp", q, k_BPKH, preferred_element_type=jnp.float32) * H**-0.5
    if causal:
        scores = jnp.where(jnp.tril(jnp.ones((T, k_BPKH.shape[1]), bool)), scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BPKH.dtype)
    return jnp.einsum("bkgtp,bpkh->btkgh", probs, v_BPKH).reshape(B, T, N, H)


class PrefixAttention(nn.Module):
    """Add the gated attention over the prefix keys/values to the tokens' attention output.

    The prefix is trained (prefix, ptuning_v2) or is the soft prompt's own rows at this
    layer (prompt, ptuning), passed in as `prompt`; in that case the prompt rows' own
    (causal) attention output is put back ahead of the tokens'.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, q_BTNH, out_BTNH, prompt=None):
        cfg = self.cfg
        P, K, H, N = cfg.peft.n_virtual, cfg.kv_heads, cfg.head_dim, cfg.n_heads
        gate_N = self.param("gate", nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)), (N,), jnp.float32)
        if prompt is None:
            k_PKH, v_PKH = self._trained_prefix(P, K, H)
            B = q_BTNH.shape[0]
            k_BPKH = jnp.broadcast_to(k_PKH.astype(q_BTNH.dtype), (B, P, K, H))
            v_BPKH = jnp.broadcast_to(v_PKH.astype(q_BTNH.dtype), (B, P, K, H))
        else:
            q_BPNH, k_BPKH, v_BPKH = prompt
        gated = _attend_all(q_BTNH, k_BPKH, v_BPKH) * gate_N[:, None].astype(out_BTNH.dtype)
        out_BTNH = out_BTNH + gated
        if prompt is not None:
            out_BTNH = jnp.concatenate([_attend_all(q_BPNH, k_BPKH, v_BPKH, causal=True), out_BTNH], axis=1)
        return out_BTNH

    def _trained_prefix(self, P, K, H):
        cfg = self.cfg
        if cfg.peft.method == "ptuning_v2":
            init = nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "kv_heads", "head_dim"))
            return self.param("key", init, (P, K, H), jnp.float32), self.param("value", init, (P, K, H), jnp.float32)
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, None))
        e_PE = self.param("embedding", init, (P, cfg.peft.encoder_hidden), jnp.float32)
        kv = Reparameterization(cfg.peft.encoder_hidden, 2 * K * H, name="encoder")(e_PE).reshape(P, 2, K, H)
        return kv[:, 0], kv[:, 1]
