"""Attention: masks, position biases, the key/value cache and the attention layer.

Masks are built once per forward pass from integer positions (`AttentionContext`) and
shared by every layer, so a layer never decides what it may attend to. The same rule
serves training and decoding:

    key s is visible to query t  iff  k_pos[s] <= q_pos[t]                    (causal)
                                      or both tokens are in the prefix        (prefix-LM)
                                  and  they belong to the same segment        (packing)
                                  and  q_pos[t] - k_pos[s] < sliding_window   (if set)

When decoding, cache slot s holds the token at position s, so `k_pos` is just `arange(S)`
and unwritten slots are invisible because they lie in the future.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.models import positions as pos_lib
from llm_jax.models import peft as peft_lib
from llm_jax.models.layers import compute_dtype, dense
from llm_jax.models.paged import PagedKernelStep, PagedWrite, paged_kernel_attention, paged_update

# A large negative logit instead of -inf: a fully masked row (padding) softmaxes to a
# uniform distribution rather than NaN, and its output is never read.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, plus what each batch row has written so far.

    k, v:       [L, B, S, K, H]  in the compute dtype, or int8 for a quantized cache
    end:        [B] int32        slots filled per row; the next token is written at `end`
    prefix:     [B, S] bool      which filled slots are prefix tokens (prefix-LM only)
    k_scale, v_scale: [L, B, S, K] f32 per-token, per-head scales of an int8 cache, else None

    As with the paged cache (models/paged.py), the layers only read the cache (through the
    `CacheWrite` plan in their AttentionContext) and return their new entries; the cache
    writes all layers' at once, after the last layer. Threading the cache through the layer
    scan instead made XLA copy all of it every decoding step.

    Writes past `max_len` cannot be detected inside jit (they are dropped), so callers check
    lengths before decoding, as `llm_jax.inference.generate` does.
    """

    k: jax.Array
    v: jax.Array
    end: jax.Array
    prefix: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None, int8: bool = False) -> "KVCache":
        """An empty cache; `int8=True` stores keys and values as int8 with f32 scales."""
        if max_len > cfg.max_seq_len:
            raise ValueError(
                f"cache length {max_len} exceeds the model's context model.max_seq_len={cfg.max_seq_len}"
            )
        if cfg.mask == "bidirectional":
            raise ValueError("model.mask='bidirectional' has no causal order to decode with a cache")
        shape = (cfg.n_layers, batch, max_len, cfg.kv_heads, cfg.head_dim)
        dtype = jnp.int8 if int8 else (compute_dtype(cfg) if dtype is None else dtype)
        scale = jnp.ones(shape[:-1], jnp.float32) if int8 else None
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            end=jnp.zeros((batch,), jnp.int32),
            prefix=jnp.zeros((batch, max_len), bool),
            k_scale=scale,
            v_scale=scale,
        )

    def stored(self) -> tuple:
        """The stored arrays, stacked over layers: (k, v[, k_scale, v_scale])."""
        if self.k_scale is None:
            return (self.k, self.v)
        return (self.k, self.v, self.k_scale, self.v_scale)

    def layer_entries(self) -> tuple:
        """Each layer's entry is just its index into the stored arrays (see CacheWrite)."""
        return (jnp.arange(self.k.shape[0]),)

    def write_plan(self, q_pos_BT: jax.Array) -> "CacheWrite":
        del q_pos_BT  # a row's new tokens go to consecutive slots from `end`
        return CacheWrite(start_B=self.end, stored=self.stored())

    def with_layer_entries(self, entries: tuple, end: jax.Array, prefix: jax.Array) -> "KVCache":
        """Write every layer's new entries, each [L, B, T, ...], at each row's `end`: one scatter per array."""
        k, v, *scales = (_write(c, n, self.end) for c, n in zip(self.stored(), entries))
        k_scale, v_scale = scales if scales else (None, None)
        return self.replace(k=k, v=v, k_scale=k_scale, v_scale=v_scale, end=end, prefix=prefix)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


@flax.struct.dataclass
class LayerKVCache:
    """A float `KVCache` re-laid out for one-token decoding steps: one array per layer, in
    the layouts the attention products read directly.

    k: tuple of L arrays [B, K, H, S]  keys, transposed for q . k
    v: tuple of L arrays [B, K, S, H]
    end, prefix: as in KVCache

    With the stacked [L, B, S, K, H] cache, every decoding step copied each layer's keys
    and values into these layouts (with the new token selected in) before the two products:
    about a quarter of a batch-8 step on XLA:CPU. Here a layer reads its arrays as they
    are, and the step's own key and value are held apart (their score joins the others at
    slot `end` before the softmax) until the cache writes them after the last layer.
    Built from a KVCache and turned back into one by `llm_jax.inference.generate`'s loop;
    only for unrolled layers (`scan_layers=False`), one token per row per call.
    """

    k: tuple
    v: tuple
    end: jax.Array
    prefix: jax.Array

    @classmethod
    def from_cache(cls, cache: KVCache) -> "LayerKVCache":
        if cache.k_scale is not None:
            raise ValueError("LayerKVCache holds float keys and values; an int8 KVCache stays stacked")
        L = cache.k.shape[0]
        return cls(k=tuple(cache.k[i].transpose(0, 2, 3, 1) for i in range(L)),
                   v=tuple(cache.v[i].transpose(0, 2, 1, 3) for i in range(L)), end=cache.end, prefix=cache.prefix)

    def to_cache(self) -> KVCache:
        return KVCache(k=jnp.stack([k.transpose(0, 3, 1, 2) for k in self.k]),
                       v=jnp.stack([v.transpose(0, 2, 1, 3) for v in self.v]), end=self.end, prefix=self.prefix)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[-1]

    def layer_entries(self) -> tuple:
        """Layer i's entry is its own (k, v) arrays (the unrolled stack indexes these tuples)."""
        return (self.k, self.v)

    def write_plan(self, q_pos_BT: jax.Array) -> "LayerCacheRead":
        if q_pos_BT.shape[1] != 1:
            raise ValueError(f"LayerKVCache decodes one token per row per call, got {q_pos_BT.shape[1]}")
        return LayerCacheRead(start_B=self.end)

    def with_layer_entries(self, entries: tuple, end: jax.Array, prefix: jax.Array) -> "LayerKVCache":
        """Write every layer's new key and value [L, B, 1, K, H] at each row's `end` (past the end: dropped)."""
        k_new, v_new = entries
        rows = jnp.arange(self.end.shape[0])
        k = tuple(c.at[rows, :, :, self.end].set(n[:, 0].astype(c.dtype), mode="drop") for c, n in zip(self.k, k_new))
        v = tuple(c.at[rows, :, self.end].set(n[:, 0].astype(c.dtype), mode="drop") for c, n in zip(self.v, v_new))
        return self.replace(k=k, v=v, end=end, prefix=prefix)


@flax.struct.dataclass
class LayerCacheRead:
    """The `write_at` of a LayerKVCache's AttentionContext: where each row's new token goes."""

    start_B: jax.Array  # [B]


@flax.struct.dataclass
class CacheWrite:
    """What attention needs to read a dense KVCache: the `write_at` of its AttentionContext."""

    start_B: jax.Array  # [B] slot of each row's first new token
    stored: tuple  # KVCache.stored(): (k, v[, k_scale, v_scale]), stacked over layers


@flax.struct.dataclass
class AttentionContext:
    """Per-forward-pass attention inputs shared by all layers."""

    q_pos: jax.Array  # [B, T] positions of the queries (RoPE angles)
    mask: jax.Array  # [B, 1, T, S] bool
    bias: jax.Array | None  # [B, N, T, S] f32 (ALiBi / relative buckets) or None
    # How to read the cache (None without one).
    write_at: CacheWrite | LayerCacheRead | PagedWrite | PagedKernelStep | None


def attention_mask(
    cfg: ModelConfig,
    q_pos_BT: jax.Array,
    k_pos_BS: jax.Array,
    q_prefix_BT: jax.Array | None = None,
    k_prefix_BS: jax.Array | None = None,
    q_segment_BT: jax.Array | None = None,
    k_segment_BS: jax.Array | None = None,
) -> jax.Array:
    """The boolean mask [B, 1, T, S] described in the module docstring."""
    q = q_pos_BT[:, :, None]
    k = k_pos_BS[:, None, :]
    if cfg.mask == "bidirectional":
        mask = jnp.ones(q.shape[:2] + k.shape[2:], bool)
    else:
        mask = k <= q
        if cfg.mask == "prefix" and q_prefix_BT is not None:
            mask = mask | (q_prefix_BT[:, :, None] & k_prefix_BS[:, None, :])
    if cfg.sliding_window is not None:
        mask = mask & (q - k < cfg.sliding_window)
    if q_segment_BT is not None:
        mask = mask & (q_segment_BT[:, :, None] == k_segment_BS[:, None, :])
    return mask[:, None]


class RelativePositionBias(nn.Module):
    """T5's learned per-head bias over bucketed key - query offsets, shared by all layers."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, q_pos_BT, k_pos_BS):
        cfg = self.cfg
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), (None, "heads")),
            (cfg.relative_buckets, cfg.n_heads),
            jnp.float32,
        )
        buckets_BTS = pos_lib.relative_buckets(
            k_pos_BS[:, None, :] - q_pos_BT[:, :, None],
            bidirectional=cfg.mask != "causal",
            n_buckets=cfg.relative_buckets,
            max_distance=cfg.relative_max_distance,
        )
        return jnp.moveaxis(table[buckets_BTS], -1, 1)  # [B, N, T, S]


def _attend_einsum(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, bias_BNTS, dropout: nn.Dropout | None):
    """Reference attention: explicit scores, f32 softmax, grouped heads without repeating K/V."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    if T == 1 and dropout is None:  # one decoding step
        return _attend_one_query(q_BTKGH, k_BSKH, v_BSKH, mask_B1TS, bias_BNTS)
    # Scores accumulate in f32 even when q and k are bf16.
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * H**-0.5
    if bias_BNTS is not None:
        scores = scores + bias_BNTS.reshape(B, K, N // K, T, -1)
    scores = jnp.where(mask_B1TS[:, :, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    if dropout is not None:
        probs = dropout(probs)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH)
    return out.reshape(B, T, N, H)


def _attend_one_query(q_B1KGH, k_BSKH, v_BSKH, mask_B11S, bias_BN1S):
    """`_attend_einsum` for a single query per row: the decoding step.

    Two batched dots over [B, K] with the query axis dropped, f32 scores and softmax.
    (Written as multiply-and-sum reductions instead, the step ran about 10x slower on
    XLA:CPU with jax 0.10 at batch 8 x 256 cached tokens.)
    """
    B, _, K, G, H = q_B1KGH.shape
    q_BKGH = q_B1KGH[:, 0]
    scores = jnp.einsum("bkgh,bskh->bkgs", q_BKGH, k_BSKH, preferred_element_type=jnp.float32) * H**-0.5
    if bias_BN1S is not None:
        scores = scores + bias_BN1S.reshape(B, K, G, -1)
    scores = jnp.where(mask_B11S, scores, _MASKED)  # [B, 1, 1, S] over [B, K, G, S]
    probs_BKGS = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out_BKGH = jnp.einsum("bkgs,bskh->bkgh", probs_BKGS, v_BSKH)
    return out_BKGH.reshape(B, 1, K * G, H)


def _attend_layer_cache(q_B1NH, k_B1KH, v_B1KH, k_BKHS, v_BKSH, start_B, mask_B11S, bias_BN1S):
    """One-query attention over a `LayerKVCache` layer, with this step's key and value held apart.

    Slot start_B of the cache is not written yet: its score and value come from the new
    key and value, the rest from the cache as it is laid out (no copy of it). Slots from
    start_B on hold zeros or keys written before; their probabilities are exactly zero.
    """
    B, _, N, H = q_B1NH.shape
    K = k_BKHS.shape[1]
    q_BKGH = q_B1NH.reshape(B, K, N // K, H)
    scores = jnp.einsum("bkgh,bkhs->bkgs", q_BKGH, k_BKHS, preferred_element_type=jnp.float32)
    fresh = jnp.einsum("bkgh,bkh->bkg", q_BKGH, k_B1KH[:, 0], preferred_element_type=jnp.float32)
    at_new_B11S = (jnp.arange(k_BKHS.shape[-1])[None, :] == start_B[:, None])[:, None, None]
    scores = jnp.where(at_new_B11S, fresh[..., None], scores) * H**-0.5
    if bias_BN1S is not None:
        scores = scores + bias_BN1S.reshape(B, K, N // K, -1)
    scores = jnp.where(mask_B11S, scores, _MASKED)
    probs_BKGS = jax.nn.softmax(scores, axis=-1)
    p_new_BKG = jnp.sum(jnp.where(at_new_B11S, probs_BKGS, 0.0), axis=-1)
    probs_BKGS = jnp.where(at_new_B11S, 0.0, probs_BKGS).astype(v_BKSH.dtype)
    out_BKGH = jnp.einsum("bkgs,bksh->bkgh", probs_BKGS, v_BKSH)
    out_BKGH = out_BKGH + (p_new_BKG[..., None] * v_B1KH[:, 0, :, None, :]).astype(out_BKGH.dtype)
    return out_BKGH.reshape(B, 1, N, H)


def _attend_dot_product(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, bias_BNTS):
    """`jax.nn.dot_product_attention`: XLA on CPU/TPU, cuDNN flash attention on GPUs."""
    bias = None if bias_BNTS is None else bias_BNTS.astype(q_BTNH.dtype)
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, bias=bias, mask=mask_B1TS)


def _write(cache_LBS_, new_LBT_, start_B):
    """Write each row's new entries (any trailing shape) at its own slots start..start+T-1, all layers at once."""
    B, T = new_LBT_.shape[1:3]
    slots_BT = start_B[:, None] + jnp.arange(T)[None, :]
    return cache_LBS_.at[:, jnp.arange(B)[:, None], slots_BT].set(new_LBT_.astype(cache_LBS_.dtype), mode="drop")


def _with_new(cached_BS_, new_BT_, start_B):
    """A layer's cached entries with its new ones in slots start..start+T-1, as one select.

    Elementwise, so XLA fuses it, and the read of the layer out of the stacked cache, into
    the copy that lays the keys out for attention: no other copy of the layer's cache.
    """
    S, T = cached_BS_.shape[1], new_BT_.shape[1]
    offset_BS = jnp.arange(S)[None, :] - start_B[:, None]
    index_BS = jnp.clip(offset_BS, 0, T - 1).reshape(offset_BS.shape + (1,) * (new_BT_.ndim - 2))
    new_BS_ = jnp.take_along_axis(new_BT_, index_BS, axis=1) if T > 1 else new_BT_
    fresh_BS = ((offset_BS >= 0) & (offset_BS < T)).reshape(index_BS.shape)
    return jnp.where(fresh_BS, new_BS_.astype(cached_BS_.dtype), cached_BS_)


def quantize_int8(x_BTKH):
    """Symmetric int8 with one f32 scale per token and head (absmax over head_dim)."""
    scale_BTK = jnp.maximum(jnp.abs(x_BTKH.astype(jnp.float32)).max(axis=-1), 1e-8) / 127.0
    q = jnp.clip(jnp.round(x_BTKH.astype(jnp.float32) / scale_BTK[..., None]), -127, 127)
    return q.astype(jnp.int8), scale_BTK


def _update_cache(kv, k_BTKH, v_BTKH, plan, dtype):
    """This layer's keys/values to attend (cache plus new tokens) and its new entries for the cache."""
    if isinstance(plan, PagedWrite):  # a page pool read through page tables (models/paged.py)
        return paged_update(kv, k_BTKH, v_BTKH, plan, dtype)
    (layer,) = kv
    cached = tuple(a[layer] for a in plan.stored)
    if len(cached) == 2:
        new = (k_BTKH.astype(cached[0].dtype), v_BTKH.astype(cached[1].dtype))
        k_BSKH, v_BSKH = (_with_new(c, n, plan.start_B).astype(dtype) for c, n in zip(cached, new))
        return k_BSKH, v_BSKH, new
    (kq, ks), (vq, vs) = quantize_int8(k_BTKH), quantize_int8(v_BTKH)
    new = (kq, vq, ks, vs)
    k_q, v_q, k_s, v_s = (_with_new(c, n, plan.start_B) for c, n in zip(cached, new))
    k_BSKH = (k_q.astype(jnp.float32) * k_s[..., None]).astype(dtype)
    v_BSKH = (v_q.astype(jnp.float32) * v_s[..., None]).astype(dtype)
    return k_BSKH, v_BSKH, new


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query self-attention with an optional KV cache."""

    cfg: ModelConfig
    out_std: float
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BTD, ctx: AttentionContext, kv=None):
        """Attend over `x` (training) or over the cache after writing `x`'s keys into it.

        `kv` is this layer's cache entry (its layer index; `ctx.write_at` says how to read the
        cache), or None. Returned alongside the output: the new tokens' entries for the cache
        to write, `(k_BTKH, v_BTKH)` or, for an int8 cache, `(k, v, k_scale_BTK, v_scale_BTK)`.
        """
        cfg = self.cfg
        qkv_bias = cfg.use_bias if cfg.qkv_bias is None else cfg.qkv_bias
        N, K, H = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        if self.has_variable("params", "qkv"):  # joined by `fuse_projections` for decoding
            qkv_BTJH = dense(cfg, (N + 2 * K, H), ("embed", "heads", "head_dim"), bias=qkv_bias, name="qkv")(x_BTD)
            q_BTNH, k_BTKH, v_BTKH = jnp.split(qkv_BTJH, (N, N + K), axis=-2)
        else:
            q_BTNH = dense(cfg, (N, H), ("embed", "heads", "head_dim"), bias=qkv_bias, name="query")(x_BTD)
            k_BTKH = dense(cfg, (K, H), ("embed", "kv_heads", "head_dim"), bias=qkv_bias, name="key")(x_BTD)
            v_BTKH = dense(cfg, (K, H), ("embed", "kv_heads", "head_dim"), bias=qkv_bias, name="value")(x_BTD)
        # Prompt tuning: soft-prompt rows lead x; they attend among themselves, never enter the cache.
        q_BTNH, k_BTKH, v_BTKH, prompt = peft_lib.split_prompt(cfg, q_BTNH, k_BTKH, v_BTKH)
        q_BTNH = nn.with_logical_constraint(q_BTNH, ("batch", "length", "heads", "head_dim"))
        if cfg.position == "rope":
            inv_freq = pos_lib.rope_inverse_frequencies(cfg)
            q_BTNH = pos_lib.apply_rope(q_BTNH, ctx.q_pos, inv_freq)
            k_BTKH = pos_lib.apply_rope(k_BTKH, ctx.q_pos, inv_freq)

        if isinstance(ctx.write_at, PagedKernelStep):  # a one-token step through the Pallas kernel
            if q_BTNH.shape[1] != 1 or ctx.bias is not None or cfg.sliding_window is not None:
                raise ValueError("the Pallas paged-attention kernel takes one token per row and has no position "
                                 "bias or sliding window (model.position alibi/relative, model.sliding_window): "
                                 "use the gather path (PagedKVCache kernel='gather')")
            out_BTNH, new_kv = paged_kernel_attention(q_BTNH, k_BTKH, v_BTKH, kv, ctx.write_at)
        elif isinstance(ctx.write_at, LayerCacheRead):  # a decoding step over a LayerKVCache
            if q_BTNH.shape[1] != 1:
                raise ValueError("a LayerKVCache decodes one token per row (no soft-prompt rows)")
            k_BKHS, v_BKSH = (c.astype(q_BTNH.dtype) for c in kv)
            out_BTNH = _attend_layer_cache(q_BTNH, k_BTKH.astype(q_BTNH.dtype), v_BTKH.astype(q_BTNH.dtype), k_BKHS,
                                           v_BKSH, ctx.write_at.start_B, ctx.mask, ctx.bias)
            new_kv = (k_BTKH, v_BTKH)
        else:
            out_BTNH, new_kv = self._attend(q_BTNH, k_BTKH, v_BTKH, ctx, kv)
        if peft_lib.attends_prefix(cfg):  # prefix / prompt tuning: + gate * attention over the prefix
            out_BTNH = peft_lib.PrefixAttention(cfg, name="prefix")(q_BTNH, out_BTNH, prompt)
        out_BTNH = nn.with_logical_constraint(out_BTNH, ("batch", "length", "heads", "head_dim"))
        out_BTD = dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), n_in=2, std=self.out_std, name="out")(
            out_BTNH
        )
        return out_BTD, new_kv

    def _attend(self, q_BTNH, k_BTKH, v_BTKH, ctx: AttentionContext, kv):
        """Attention over the new tokens, or over a dense or paged cache with them added."""
        cfg = self.cfg
        if kv is None:
            k_BSKH, v_BSKH, new_kv = k_BTKH, v_BTKH, None
        else:
            k_BSKH, v_BSKH, new_kv = _update_cache(kv, k_BTKH, v_BTKH, ctx.write_at, q_BTNH.dtype)

        if cfg.attention == "dot_product":
            out_BTNH = _attend_dot_product(q_BTNH, k_BSKH, v_BSKH, ctx.mask, ctx.bias)
        else:
            drop = None
            if cfg.attention_dropout > 0 and not self.deterministic:
                drop = nn.Dropout(cfg.attention_dropout, deterministic=False)
            out_BTNH = _attend_einsum(q_BTNH, k_BSKH, v_BSKH, ctx.mask, ctx.bias, drop)
        return out_BTNH, new_kv
