"""Tests of the Transformer family: masks, positions, packing, KV cache, scan/remat, precision.

Every model here is tiny (2 layers, d_model 32, 12 tokens) so the file runs on a 2-core CPU
in about a minute and a half, nearly all of it XLA compiling one small program per
configuration. `init_std` is raised to 0.1 so that logits are O(1) and attention is far from
uniform: with the default 0.02, "these logits are equal" would hold for almost any model.

Claims of the form "X does not affect Y" are checked bitwise (a masked key contributes an
exact 0 to the softmax), comparing the same batch row of two calls of one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from llm_jax.config import ModelConfig, PeftConfig
from llm_jax.models import (
    KVCache,
    LayerKVCache,
    Transformer,
    fuse_projections,
    init_params,
    param_logical_axes,
    param_shapes,
    stack_layer_params,
    unstack_layer_params,
)

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32, init_std=0.1)
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "relative", "none")
HEADS = {"mha": None, "gqa": 2, "mqa": 1}  # n_kv_heads, with n_heads=4
T = 12  # sequence length
P = 5  # prefix length for prefix-LM tests

# The file compiles about a hundred tiny programs; LLVM's optimisations cost more than they save.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# Fields that change the forward pass but not the parameters.
_FORWARD_ONLY = dict(
    mask="causal", attention="einsum", dtype="auto", remat="none", dropout=0.0, attention_dropout=0.0,
    sliding_window=None, scan_layers=True,
)


def config(**overrides) -> ModelConfig:
    return dataclasses.replace(BASE, **overrides)


@functools.lru_cache(maxsize=None)
def _scanned_params(cfg: ModelConfig):
    """Random parameters with the structure of `init_params(cfg, ...)` (checked below).

    Drawn with NumPy from `param_shapes` to skip compiling an initialiser per config. Norm
    scales are drawn around 1 and biases around 0, rather than exactly 1 and 0, so that
    every parameter matters.
    """
    rng = np.random.default_rng(0)

    def draw(path, shape_dtype):
        x = rng.normal(0.0, cfg.init_std, shape_dtype.shape)
        return jnp.asarray(1.0 + x if path[-1].key == "scale" else x, shape_dtype.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(param_shapes(cfg)))


def params_for(cfg: ModelConfig):
    """The parameters of `cfg` (shared by configs that differ only in the forward pass)."""
    params = _scanned_params(dataclasses.replace(cfg, **_FORWARD_ONLY))
    return params if cfg.scan_layers else unstack_layer_params(params, cfg.n_layers)


def random_tokens(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, BASE.vocab_size, shape, dtype=np.int32)


@functools.partial(jit, static_argnums=0)
def forward(cfg, params, tokens, positions=None, segment_ids=None, prefix_mask=None, dropout_rng=None):
    """Logits of a whole sequence, no cache; dropout is on iff `dropout_rng` is given."""
    logits, cache = Transformer(cfg).apply(
        {"params": params},
        tokens,
        positions_BT=positions,
        segment_ids_BT=segment_ids,
        prefix_mask_BT=prefix_mask,
        deterministic=dropout_rng is None,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng},
    )
    assert cache is None
    return logits


def _loss_and_grads(cfg, params, tokens, dropout_rng=None):
    """Next-token cross-entropy, the logits and d loss / d params."""

    def loss_fn(p):
        logits = Transformer(cfg).apply(
            {"params": p},
            tokens[:, :-1],
            deterministic=dropout_rng is None,
            rngs=None if dropout_rng is None else {"dropout": dropout_rng},
        )[0]
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(log_probs, tokens[:, 1:, None], -1).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, logits, grads


loss_and_grads = jit(_loss_and_grads, static_argnums=0)


def assert_trees_close(a, b, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def expected_dependency(mask: str) -> np.ndarray:
    """dep[s, t]: may the output at position t depend on the input at position s?

    For mask='prefix' the first P tokens are the prefix.
    """
    s, t = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    if mask == "bidirectional":
        return np.ones((T, T), bool)
    if mask == "prefix":
        return (s <= t) | ((s < P) & (t < P))
    return s <= t


def prefix_mask(batch: int, n_prefix: int = P) -> np.ndarray:
    return np.broadcast_to(np.arange(T) < n_prefix, (batch, T))


# ------------------------------------------------------------------ masks and causality


def token_influence(cfg, prefix=None) -> np.ndarray:
    """changed[s, t]: does replacing token s change the logits at position t (at all)?

    Row s of the batch has token s replaced; it is compared with row s of an unchanged
    batch, so both values come from the same row of the same compiled program.
    """
    base = random_tokens(T, seed=1)
    perturbed = np.tile(base, (T, 1))
    perturbed[np.arange(T), np.arange(T)] = (base + 1) % cfg.vocab_size
    mask = None if prefix is None else prefix_mask(T, prefix)
    params = params_for(cfg)
    reference = np.asarray(forward(cfg, params, np.tile(base, (T, 1)), prefix_mask=mask))
    logits = np.asarray(forward(cfg, params, perturbed, prefix_mask=mask))
    return (logits != reference).any(-1)


@pytest.mark.parametrize("position", POSITIONS)
def test_causal_model_ignores_future_tokens(position):
    changed = token_influence(config(position=position))
    np.testing.assert_array_equal(changed, expected_dependency("causal"))


@pytest.mark.parametrize("position", ["rope", "alibi", "relative"])
@pytest.mark.parametrize("mask", ["prefix", "bidirectional"])
def test_prefix_lm_and_bidirectional_token_influence(mask, position):
    cfg = config(mask=mask, position=position)
    changed = token_influence(cfg, prefix=P if mask == "prefix" else None)
    # prefix: tokens inside the prefix influence earlier prefix positions; later ones do not.
    np.testing.assert_array_equal(changed, expected_dependency(mask))


@pytest.mark.parametrize("window", [1, 3])
def test_sliding_window_receptive_field_grows_by_window_per_layer(window):
    cfg = config(sliding_window=window)
    s, t = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    # Each layer sees the last `window` positions (itself included): window - 1 more per layer.
    np.testing.assert_array_equal(token_influence(cfg), (s <= t) & (t - s <= cfg.n_layers * (window - 1)))


@functools.partial(jit, static_argnums=0)
def embedding_jacobian(cfg, params, tokens_1T, prefix_mask_1T):
    """|d (logits[t] . r) / d x[s]|, maxed over features, where x is the token embedding."""
    r_V = jax.random.normal(jax.random.key(1), (cfg.vocab_size,))

    def projected_logits(delta_TD):
        def add_delta(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.module.name == "embed" and context.method_name == "__call__":
                out = out + delta_TD
            return out

        with nn.intercept_methods(add_delta):
            logits = Transformer(cfg).apply({"params": params}, tokens_1T, prefix_mask_BT=prefix_mask_1T)[0]
        return logits[0] @ r_V  # [T]

    jac_TSD = jax.jacrev(projected_logits)(jnp.zeros((T, cfg.d_model)))
    return jnp.abs(jac_TSD).max(-1)  # [t, s]


@pytest.mark.parametrize("mask", ["causal", "prefix", "bidirectional"])
def test_gradient_flows_only_from_visible_positions(mask):
    cfg = config(mask=mask)
    mask_1T = prefix_mask(1) if mask == "prefix" else None
    jac = np.asarray(embedding_jacobian(cfg, params_for(cfg), random_tokens(1, T), mask_1T))
    dependency = expected_dependency(mask)
    # Exactly zero where masked, clearly non-zero where visible.
    np.testing.assert_array_equal(jac.T[~dependency], 0.0)
    assert jac.T[dependency].min() > 1e-6


# ------------------------------------------------------------------------- packing


@pytest.mark.parametrize(
    "mask,position",
    [("causal", p) for p in POSITIONS] + [("prefix", "relative"), ("bidirectional", "relative")],
)
def test_packed_documents_are_isolated(mask, position):
    cfg = config(mask=mask, position=position)
    params = params_for(cfg)
    n1, n2 = 5, T - 5
    doc1, doc1_alt, doc2 = random_tokens(n1, seed=1), random_tokens(n1, seed=2), random_tokens(n2, seed=3)
    segments = np.array([[1] * n1 + [2] * n2])
    positions = np.concatenate([np.arange(n1), np.arange(n2)])[None]
    in_prefix = (positions < 2) if mask == "prefix" else None

    def packed(first):
        row = np.concatenate([first, doc2])[None]
        return np.asarray(forward(cfg, params, row, positions, segments, in_prefix))[0, n1:]

    alone = forward(cfg, params, doc2[None], prefix_mask=None if in_prefix is None else in_prefix[:, n1:])
    np.testing.assert_allclose(packed(doc1), alone[0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(packed(doc1_alt), packed(doc1))


# ----------------------------------------------------------------------- positions


@pytest.mark.parametrize("position", POSITIONS)
def test_shifting_positions_changes_only_absolute_encodings(position):
    cfg = config(position=position)
    positions = np.stack([np.arange(T), np.arange(T) + 7])
    logits = np.asarray(forward(cfg, params_for(cfg), np.tile(random_tokens(T), (2, 1)), positions))
    diff = np.abs(logits[0] - logits[1]).max()
    if position in ("learned", "sinusoidal"):
        assert diff > 1e-2  # absolute positions: shows that the check below can fail
    else:
        assert diff < 1e-4


# ------------------------------------------------------------------ scan and remat


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(position="relative", n_kv_heads=2, norm="layernorm", activation="gelu", use_bias=True, tie_embeddings=False),
    ],
    ids=["rope-swiglu", "relative-gqa-gelu-bias"],
)
def test_scanned_and_unrolled_layers_agree(overrides):
    cfg = config(**overrides)
    params = params_for(cfg)
    tokens = random_tokens(2, T + 1)
    loss, logits, grads = loss_and_grads(cfg, params, tokens)

    unrolled_cfg = dataclasses.replace(cfg, scan_layers=False)
    unrolled_params = unstack_layer_params(params, cfg.n_layers)
    assert "layers" not in unrolled_params and "layers_1" in unrolled_params
    assert_trees_close(stack_layer_params(unrolled_params, cfg.n_layers), params, atol=0)

    u_loss, u_logits, u_grads = loss_and_grads(unrolled_cfg, unrolled_params, tokens)
    np.testing.assert_allclose(u_logits, logits, atol=1e-6, rtol=0)
    np.testing.assert_allclose(u_loss, loss, atol=1e-6, rtol=0)
    assert_trees_close(u_grads, unstack_layer_params(grads, cfg.n_layers), atol=1e-6)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize(
    "overrides",
    [dict(n_kv_heads=2), dict(n_kv_heads=1, use_bias=True, activation="gelu"), dict(qkv_bias=True)],
    ids=["gqa-swiglu", "mqa-bias-gelu", "qkv-bias-swiglu"],
)
def test_fused_projections_give_the_same_logits(overrides, scan_layers):
    cfg = config(scan_layers=scan_layers, **overrides)
    params = params_for(cfg)
    fused = fuse_projections(params)
    layer = fused["layers" if scan_layers else "layers_0"]
    assert set(layer["attention"]) == {"qkv", "out"}
    assert ("wi_gate_up" in layer["mlp"]) == (cfg.activation == "swiglu")
    assert ("bias" in layer["attention"]["qkv"]) == bool(cfg.use_bias or cfg.qkv_bias)
    tokens = random_tokens(2, T)
    np.testing.assert_allclose(forward(cfg, fused, tokens), forward(cfg, params, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
def test_logits_at_one_position_per_row_match_the_full_forward(tie_embeddings):
    cfg = config(tie_embeddings=tie_embeddings)
    params, tokens = params_for(cfg), random_tokens(2, T)
    model = Transformer(cfg)
    full, _ = model.apply({"params": params}, tokens)
    at_B = jnp.array([T - 1, 4])  # rows end at different lengths, as padded prompts do
    picked, _ = model.apply({"params": params}, tokens, logits_at_B=at_B)
    assert picked.shape == (2, 1, cfg.vocab_size)
    np.testing.assert_allclose(picked[:, 0], full[jnp.arange(2), at_B], atol=1e-6, rtol=0)
    # With a cache: the same logits, and the same cache as a pass that computes them all.
    caches = [model.apply({"params": params}, tokens, cache=KVCache.init(cfg, 2, max_len=16), **kw)
              for kw in ({}, {"logits_at_B": at_B})]
    np.testing.assert_allclose(caches[1][0][:, 0], caches[0][0][jnp.arange(2), at_B], atol=1e-6, rtol=0)
    jax.tree.map(np.testing.assert_array_equal, caches[1][1], caches[0][1])
    with pytest.raises(ValueError, match="logits_at_B must hold one position per row"):
        model.apply({"params": params}, tokens, logits_at_B=jnp.array([1]))


def test_fusing_projections_leaves_lora_layers_alone():
    cfg = config(peft=PeftConfig(method="lora", lora_rank=2, lora_targets="query,wi_up"))
    params = params_for(cfg)
    fused = fuse_projections(params)
    assert set(fused["layers"]["attention"]) == {"query", "key", "value", "out"}
    assert set(fused["layers"]["mlp"]) == {"wi_gate", "wi_up", "wo"}


REMAT_POLICIES = ("full", "save_dots", "save_dots_no_batch", "save_attention_mlp_out")


@functools.partial(jit, static_argnums=0)
def loss_and_grads_per_remat_policy(cfg, params, tokens, dropout_rng):
    """`loss_and_grads` with remat off and with each policy, compiled as one program (about
    half the compile time of five; the computations stay separate, so they can disagree)."""
    return {
        policy: _loss_and_grads(dataclasses.replace(cfg, remat=policy), params, tokens, dropout_rng)
        for policy in ("none",) + REMAT_POLICIES
    }


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_remat_does_not_change_loss_or_gradients(policy, scan_layers):
    # With dropout on: the recomputed forward pass must draw the same dropout masks.
    cfg = config(scan_layers=scan_layers, dropout=0.1)
    results = loss_and_grads_per_remat_policy(cfg, params_for(cfg), random_tokens(2, T + 1), jax.random.key(3))
    loss, _, grads = results["none"]
    r_loss, _, r_grads = results[policy]
    np.testing.assert_allclose(r_loss, loss, atol=1e-6, rtol=0)
    assert_trees_close(r_grads, grads, atol=1e-6)


# ------------------------------------------------------------------------ precision


def test_bfloat16_compute_is_close_to_float32():
    f32_cfg, bf16_cfg = config(dtype="float32"), config(dtype="bfloat16")
    tokens = random_tokens(2, T)
    f32 = forward(f32_cfg, params_for(f32_cfg), tokens)
    bf16 = forward(bf16_cfg, params_for(bf16_cfg), tokens)
    assert f32.dtype == bf16.dtype == jnp.float32
    diff = np.abs(np.asarray(bf16) - np.asarray(f32)).max()
    assert 0 < diff < 0.05 * np.abs(f32).max()  # > 0: bf16 really was used
    np.testing.assert_allclose(jax.nn.softmax(bf16), jax.nn.softmax(f32), atol=2e-2)


# ------------------------------------------------------------- attention implementations

_SEGMENTS = np.array([[1] * 5 + [2] * (T - 5)] * 2)
_SEGMENT_POSITIONS = np.array([list(range(5)) + list(range(T - 5))] * 2)
# Each case combines several features, so that every head layout meets every mask, both
# additive biases, packed segments and a sliding window in a handful of compilations.
ATTENTION_CASES = {
    "causal-rope": (dict(), {}),
    "causal-alibi-window": (dict(position="alibi", sliding_window=3), {}),
    "prefix-alibi-segments": (
        dict(mask="prefix", position="alibi"),
        dict(prefix_mask=prefix_mask(2, 2), positions=_SEGMENT_POSITIONS, segment_ids=_SEGMENTS),
    ),
    "bidirectional-relative": (dict(mask="bidirectional", position="relative"), {}),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("heads", HEADS)
def test_dot_product_attention_matches_einsum(heads, case):
    overrides, inputs = ATTENTION_CASES[case]
    cfg = config(n_kv_heads=HEADS[heads], **overrides)
    params, tokens = params_for(cfg), random_tokens(2, T)
    einsum = forward(cfg, params, tokens, **inputs)
    dot_product = forward(dataclasses.replace(cfg, attention="dot_product"), params, tokens, **inputs)
    np.testing.assert_allclose(dot_product, einsum, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- KV cache


@functools.partial(jit, static_argnums=(0, 1), static_argnames=("per_layer",))
def full_and_cached_logits(cfg, n_prefill, params, tokens_BT, per_layer=False):
    """Logits of one full forward pass, and from a KV cache: `n_prefill` tokens in one call,
    then one token per call (with mask='prefix' the prefilled tokens are the prefix).
    `per_layer=True` decodes those tokens from a `LayerKVCache` with unrolled layers, as
    `generate`'s loop does.

    Returns both logits [B, T, V] and cache.end after each cached call [calls, B].
    """
    model = Transformer(cfg)
    B = tokens_BT.shape[0]
    in_prefix = full_prefix = None
    if cfg.mask == "prefix":
        in_prefix = jnp.ones((B, n_prefill), bool)
        full_prefix = jnp.broadcast_to(jnp.arange(T) < n_prefill, (B, T))
    full, _ = model.apply({"params": params}, tokens_BT, prefix_mask_BT=full_prefix)

    cache = KVCache.init(cfg, B, max_len=16)
    prefill, cache = model.apply({"params": params}, tokens_BT[:, :n_prefill], prefix_mask_BT=in_prefix, cache=cache)
    first_end = cache.end
    if per_layer:
        cache = LayerKVCache.from_cache(cache)
        model = Transformer(dataclasses.replace(cfg, scan_layers=False))
        params = unstack_layer_params(params, cfg.n_layers) if cfg.scan_layers else params

    def decode_one(cache, token_B):
        logits, cache = model.apply({"params": params}, token_B[:, None], cache=cache)
        return cache, (logits[:, 0], cache.end)

    _, (decoded_SBV, ends_SB) = jax.lax.scan(decode_one, cache, tokens_BT[:, n_prefill:].T)
    cached = jnp.concatenate([prefill, decoded_SBV.swapaxes(0, 1)], axis=1)
    return full, cached, jnp.concatenate([first_end[None], ends_SB])


# Every position type with both masks; the head layout cycles so that each layout meets
# both masks and each relative-position scheme meets two layouts (a full product would
# compile 36 programs).
KV_CASES = [
    (("mha", "gqa", "mqa")[(i + j) % 3], position, mask, None)
    for i, position in enumerate(POSITIONS)
    for j, mask in enumerate(("causal", "prefix"))
] + [("gqa", "rope", "causal", 3), ("mqa", "alibi", "causal", 3)]


@pytest.mark.parametrize("heads,position,mask,window", KV_CASES)
def test_kv_cache_decoding_matches_full_forward(heads, position, mask, window):
    cfg = config(n_kv_heads=HEADS[heads], position=position, mask=mask, sliding_window=window)
    full, cached, ends = full_and_cached_logits(cfg, P, params_for(cfg), random_tokens(2, T))
    np.testing.assert_allclose(cached, full, atol=1e-5, rtol=0)
    # end = P after the prefill, then one more after each decoded token, in both rows.
    np.testing.assert_array_equal(ends, np.arange(P, T + 1)[:, None].repeat(2, axis=1))


@pytest.mark.parametrize("heads,position,mask,window", KV_CASES[::2] + KV_CASES[-1:])
def test_per_layer_cache_decoding_matches_full_forward(heads, position, mask, window):
    cfg = config(n_kv_heads=HEADS[heads], position=position, mask=mask, sliding_window=window)
    full, cached, ends = full_and_cached_logits(cfg, P, params_for(cfg), random_tokens(2, T), per_layer=True)
    np.testing.assert_allclose(cached, full, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(ends, np.arange(P, T + 1)[:, None].repeat(2, axis=1))


def test_per_layer_cache_round_trips_and_refuses_what_it_cannot_hold():
    cfg = config(n_kv_heads=2)
    cache = KVCache.init(cfg, 2, max_len=16)
    cache = cache.replace(k=jax.random.normal(jax.random.key(0), cache.k.shape), end=jnp.array([3, 5]))
    back = LayerKVCache.from_cache(cache).to_cache()
    assert_trees_close(back, cache, atol=0)
    with pytest.raises(ValueError, match="int8"):
        LayerKVCache.from_cache(KVCache.init(cfg, 2, max_len=16, int8=True))
    with pytest.raises(ValueError, match="scan_layers=false"):
        Transformer(cfg).apply({"params": params_for(cfg)}, jnp.zeros((2, 1), jnp.int32),
                               cache=LayerKVCache.from_cache(cache))


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_dropout_only_in_training_mode(scan_layers):
    cfg = config(dropout=0.2, attention_dropout=0.1, scan_layers=scan_layers)
    params, tokens = params_for(cfg), random_tokens(2, T)
    no_dropout = forward(dataclasses.replace(cfg, dropout=0.0, attention_dropout=0.0), params, tokens)
    np.testing.assert_array_equal(forward(cfg, params, tokens), no_dropout)

    train = forward(cfg, params, tokens, dropout_rng=jax.random.key(1))
    np.testing.assert_array_equal(forward(cfg, params, tokens, dropout_rng=jax.random.key(1)), train)
    other_rng = forward(cfg, params, tokens, dropout_rng=jax.random.key(2))
    assert np.abs(train - no_dropout).max() > 1e-3
    assert np.abs(train - other_rng).max() > 1e-3


# --------------------------------------------------------------------- architectures


@pytest.mark.parametrize(
    "overrides,present,absent",
    [
        (dict(parallel_block=True), ["layers/attention_norm"], ["layers/mlp_norm"]),
        (
            dict(position="learned", norm="layernorm", activation="gelu", use_bias=True, tie_embeddings=False),
            ["unembed/kernel", "position_embed/embedding", "final_norm/bias", "layers/mlp/wi/bias", "layers/attention/query/bias"],
            ["layers/mlp/wi_gate", "unembed/bias"],
        ),
        (dict(activation="geglu"), ["layers/mlp/wi_gate/kernel", "layers/mlp/wi_up/kernel"], ["layers/mlp/wi", "unembed"]),
        (dict(use_bias=False, qkv_bias=True), ["layers/attention/key/bias"], ["layers/attention/out/bias"]),
    ],
    ids=["parallel-block", "gpt2-style", "geglu", "qkv-bias"],
)
def test_architecture_variants_run(overrides, present, absent):
    cfg = config(**overrides)
    params = params_for(cfg)
    names = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    prefixes = {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 2)}
    assert set(present) <= prefixes, sorted(names)
    assert not set(absent) & prefixes, sorted(names)
    logits = forward(cfg, params, random_tokens(2, T))
    assert logits.shape == (2, T, cfg.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(logits).all()


# --------------------------------------------------------------------- parameters


def test_params_for_matches_init_params():
    cfg = config(position="relative", norm="layernorm", use_bias=True, tie_embeddings=False)
    real = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    ours = params_for(cfg)
    assert jax.tree.structure(ours) == jax.tree.structure(real)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(real)):
        assert (x.shape, x.dtype) == (y.shape, y.dtype)




_AXIS_NAMES = {"embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers", None}


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(position="learned", norm="layernorm", use_bias=True, tie_embeddings=False, n_kv_heads=2),
        dict(position="relative", scan_layers=False),
    ],
    ids=["default", "gpt2-style-gqa", "relative-unrolled"],
)
def test_param_logical_axes(overrides):
    cfg = config(**overrides)
    specs = param_logical_axes(cfg)
    params = params_for(cfg)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    assert jax.tree.structure(specs, is_leaf=is_spec) == jax.tree.structure(params)
    for (path, spec), param in zip(jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec), jax.tree.leaves(params)):
        name = jax.tree_util.keystr(path)
        assert is_spec(spec), name
        assert len(spec) == param.ndim, (name, spec, param.shape)
        assert set(spec) <= _AXIS_NAMES, (name, spec)
        assert (spec[0] == "layers") == (path[0].key == "layers"), (name, spec)
    assert specs["embed"]["embedding"] == PartitionSpec("vocab", "embed")
    layer = specs["layers"] if cfg.scan_layers else specs["layers_0"]
    stacked = ("layers",) if cfg.scan_layers else ()
    assert layer["attention"]["key"]["kernel"] == PartitionSpec(*stacked, "embed", "kv_heads", "head_dim")
    assert layer["attention"]["out"]["kernel"] == PartitionSpec(*stacked, "heads", "head_dim", "embed")


# ------------------------------------------------------------------------ bad input


# Config validation (bad n_heads, position, norm, ...) is tested in test_config.py.


def test_bad_model_inputs_raise_value_error():
    params = params_for(BASE)
    tokens = random_tokens(1, T)
    apply = functools.partial(Transformer(BASE).apply, {"params": params})
    with pytest.raises(ValueError, match="prefix_mask"):
        apply(tokens, prefix_mask_BT=prefix_mask(1))
    with pytest.raises(ValueError, match="max_seq_len"):
        apply(random_tokens(1, BASE.max_seq_len + 1))
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache.init(BASE, 1, BASE.max_seq_len + 1)
    with pytest.raises(ValueError, match="bidirectional"):
        KVCache.init(config(mask="bidirectional"), 1, 16)
    with pytest.raises(ValueError, match="positions"):
        apply(tokens, positions_BT=np.arange(T)[None], cache=KVCache.init(BASE, 1, 16))
