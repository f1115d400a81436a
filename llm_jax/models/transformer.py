"""The decoder-only Transformer: causal LM, prefix-LM and bidirectional (encoder) variants.

    tokens -> embed (+ learned / sinusoidal positions) -> L x Block -> norm -> logits

    Block (pre-norm):   x += Attention(Norm(x));  x += MLP(Norm(x))
    Block (parallel):   h = Norm(x);  x += Attention(h) + MLP(h)          (PaLM, GPT-J)

The layer stack is one `nn.scan` (parameters carry a leading `layers` axis) under
`nn.remat` with a named policy; `scan_layers=False` unrolls it into `layers_0..L-1` with
identical results (`unstack_layer_params` converts between the two).

`Transformer.__call__` always returns `(logits_BTV, cache)`: the cache is None unless one
was passed in, in which case the new tokens' keys and values have been written into it.
The final normalised hidden states are sown as `intermediates/final_hidden_BTD`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llm_jax.config import ModelConfig
from llm_jax.models import positions as pos_lib
from llm_jax.models.attention import (
    Attention,
    AttentionContext,
    KVCache,
    LayerKVCache,
    RelativePositionBias,
    attention_mask,
)
from llm_jax.models import peft as peft_lib
from llm_jax.models.layers import MLP, Norm, compute_dtype, dense, param_dtype
from llm_jax.models.paged import PagedKernelStep, WrittenPools

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_mlp_out": jax.checkpoint_policies.save_only_these_names("attention_out", "mlp_out"),
    # The same two tensors, parked in pinned host memory between forward and backward.
    "offload_attention_mlp_out": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=("attention_out", "mlp_out"),
        offload_src="device", offload_dst="pinned_host"),
}


class Block(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BTD, ctx: AttentionContext, kv=None):
        cfg = self.cfg
        # GPT-2's scaled init: residual-branch outputs shrink with depth.
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        h_BTD = Norm(cfg, name="attention_norm")(x_BTD)
        # PEFT bottleneck adapters (model.peft.method=adapter) on both sublayer outputs.
        adapt = peft_lib.Adapter if cfg.peft.method == "adapter" else None
        attn_BTD, kv = Attention(cfg, out_std, self.deterministic, name="attention")(h_BTD, ctx, kv)
        if adapt:
            attn_BTD = adapt(cfg, name="adapter_attention")(attn_BTD)
        attn_BTD = checkpoint_name(attn_BTD, "attention_out")
        if cfg.parallel_block:
            mlp_BTD = MLP(cfg, out_std, name="mlp")(h_BTD)
            if adapt:
                mlp_BTD = adapt(cfg, name="adapter_mlp")(mlp_BTD)
            x_BTD = x_BTD + drop(attn_BTD) + drop(checkpoint_name(mlp_BTD, "mlp_out"))
        else:
            x_BTD = x_BTD + drop(attn_BTD)
            mlp_BTD = MLP(cfg, out_std, name="mlp")(Norm(cfg, name="mlp_norm")(x_BTD))
            if adapt:
                mlp_BTD = adapt(cfg, name="adapter_mlp")(mlp_BTD)
            x_BTD = x_BTD + drop(checkpoint_name(mlp_BTD, "mlp_out"))
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))
        return x_BTD, kv


class Transformer(nn.Module):
    cfg: ModelConfig
    # Optional replacement for the scanned layer stack, e.g. a pipeline-parallel schedule:
    # called as layer_runner(block_fn, layer_params, x_BTD, ctx) -> x_BTD, where
    # block_fn(one_layer_params, x_BTD, ctx) -> x_BTD applies one Block. Training only.
    layer_runner: Callable | None = None

    @nn.compact
    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        prefix_mask_BT: jax.Array | None = None,
        cache: KVCache | None = None,
        deterministic: bool = True,
        logits_at_B: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Logits [B, T, V] in f32, and the updated cache (None when none was given).

        positions_BT:   per-token positions (restarting per packed document); default 0..T-1.
        segment_ids_BT: packed-document ids; tokens attend only within their segment.
        prefix_mask_BT: prefix-LM only: True on prefix tokens, which attend bidirectionally.
        cache:          decode against a `KVCache`: positions continue from `cache.end`.
        logits_at_B:    one position per row: only its logits are computed, [B, 1, V] (a
                        prompt's next token needs its last position's; the output
                        projection of the others would be wasted).
        """
        cfg = self.cfg
        if isinstance(cache, LayerKVCache) and cfg.scan_layers:
            raise ValueError("a LayerKVCache holds one array per layer: it needs model.scan_layers=false")
        ctx, new_prefix = self._context(tokens_BT, positions_BT, segment_ids_BT, prefix_mask_BT, cache)

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=compute_dtype(cfg),
            param_dtype=param_dtype(cfg),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
            name="embed",
        )
        x_BTD = embed(tokens_BT)
        if cfg.position == "learned":
            x_BTD = x_BTD + nn.Embed(
                cfg.max_seq_len,
                cfg.d_model,
                dtype=compute_dtype(cfg),
                param_dtype=param_dtype(cfg),
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std / 2), (None, "embed")),
                name="position_embed",
            )(ctx.q_pos)
        elif cfg.position == "sinusoidal":
            x_BTD = x_BTD + pos_lib.sinusoidal(ctx.q_pos, cfg.d_model).astype(x_BTD.dtype)
        x_BTD = nn.Dropout(cfg.dropout, deterministic=deterministic)(x_BTD)
        n_prompt = peft_lib.prompt_rows(cfg)
        if n_prompt:  # prompt tuning / P-tuning: soft-prompt rows ahead of the tokens (models/peft.py)
            x_BTD = peft_lib.SoftPrompt(cfg, name="soft_prompt")(x_BTD)
        x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "embed"))

        kv = None if cache is None else cache.layer_entries()
        x_BTD, kv = self._layers(x_BTD, ctx, kv, deterministic)
        if n_prompt:
            x_BTD = x_BTD[:, n_prompt:]

        x_BTD = Norm(cfg, name="final_norm")(x_BTD)
        # For heads on top of the LM (reward, value) and probing: apply(..., mutable="intermediates").
        self.sow("intermediates", "final_hidden_BTD", x_BTD)
        if logits_at_B is not None:
            if logits_at_B.shape != tokens_BT.shape[:1]:
                raise ValueError(f"logits_at_B must hold one position per row, shape ({tokens_BT.shape[0]},); "
                                 f"got shape {logits_at_B.shape}")
            x_BTD = jnp.take_along_axis(x_BTD, logits_at_B[:, None, None], axis=1)
        if cfg.tie_embeddings:
            logits_BTV = embed.attend(x_BTD)
        else:
            logits_BTV = dense(cfg, cfg.vocab_size, ("embed", "vocab"), bias=False, name="unembed")(x_BTD)
        logits_BTV = nn.with_logical_constraint(logits_BTV.astype(jnp.float32), ("batch", "length", "vocab"))

        if cache is None:
            return logits_BTV, None
        T = tokens_BT.shape[1]
        # The write must follow every layer's read of the cache, or XLA cannot write in place
        # and copies the whole cache (or page pool) on every step. The last layer's read is
        # not an input of the write (only its new keys are), so the write positions are made
        # to depend on the logits: a row whose logits are NaN writes past the end (dropped).
        diverged_B = jnp.isnan(logits_BTV[:, -1, 0])
        write_from = cache.replace(end=jnp.where(diverged_B, cache.max_len, cache.end))
        return logits_BTV, write_from.with_layer_entries(kv, end=cache.end + T, prefix=new_prefix)

    def _context(self, tokens_BT, positions_BT, segment_ids_BT, prefix_mask_BT, cache):
        """Positions, mask and position bias for this pass; also the cache's new prefix flags."""
        cfg = self.cfg
        B, T = tokens_BT.shape
        if prefix_mask_BT is not None and cfg.mask != "prefix":
            raise ValueError(f"prefix_mask was given but model.mask={cfg.mask!r}; it applies to mask='prefix' only")
        if cache is None:
            if T > cfg.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds model.max_seq_len={cfg.max_seq_len}")
            q_pos = jnp.broadcast_to(jnp.arange(T), (B, T)) if positions_BT is None else positions_BT
            k_pos, k_prefix, new_prefix, write_at = q_pos, prefix_mask_BT, None, None
            mask = attention_mask(cfg, q_pos, k_pos, prefix_mask_BT, k_prefix, segment_ids_BT, segment_ids_BT)
        else:
            if positions_BT is not None or segment_ids_BT is not None:
                raise ValueError("with a cache, positions follow cache.end; positions/segment_ids must be None")
            write_at = cache.end
            q_pos = write_at[:, None] + jnp.arange(T)[None, :]
            k_pos = jnp.broadcast_to(jnp.arange(cache.max_len), (B, cache.max_len))
            q_prefix = jnp.zeros((B, T), bool) if prefix_mask_BT is None else prefix_mask_BT
            new_prefix = jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (s,)))(
                cache.prefix, q_prefix, write_at
            )
            mask = attention_mask(cfg, q_pos, k_pos, q_prefix, new_prefix)
            # The layers read the cache through this plan; the cache writes their new entries afterwards.
            write_at = cache.write_plan(q_pos)

        bias = None
        if cfg.position == "alibi":
            bias = pos_lib.alibi_bias(q_pos, k_pos, cfg.n_heads)
        elif cfg.position == "relative":
            bias = RelativePositionBias(cfg, name="relative_bias")(q_pos, k_pos)
        return AttentionContext(q_pos=q_pos, mask=mask, bias=bias, write_at=write_at), new_prefix

    def _layers(self, x_BTD, ctx, kv, deterministic):
        cfg = self.cfg
        if self.layer_runner is not None and not self.is_initializing():
            return self._run_layers(x_BTD, ctx, kv, deterministic), kv
        block = Block
        if cfg.remat != "none":
            # Inside scan the loop boundary already prevents CSE from undoing remat.
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if isinstance(ctx.write_at, PagedKernelStep):
            return self._kernel_step_layers(block, x_BTD, ctx, deterministic)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, 0),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            return stack(cfg, deterministic, name="layers")(x_BTD, ctx, kv)
        new_kv = []
        for i in range(cfg.n_layers):
            layer_kv = None if kv is None else tuple(a[i] for a in kv)
            x_BTD, layer_kv = block(cfg, deterministic, name=f"layers_{i}")(x_BTD, ctx, layer_kv)
            new_kv.append(layer_kv)
        return x_BTD, (None if kv is None else tuple(jnp.stack(a) for a in zip(*new_kv)))

    def _kernel_step_layers(self, block, x_BTD, ctx, deterministic):
        """Unrolled layers that each write their step's keys and values into the page pools
        before reading them through the Pallas kernel (models/paged.py): the pools pass from
        layer to layer, and XLA writes them in place."""
        cfg = self.cfg
        if cfg.scan_layers:
            raise ValueError("the Pallas paged-attention step passes the pools from layer to layer: it needs "
                             "unrolled layers (model.scan_layers=false, e.g. the weights through "
                             "llm_jax.models.unstack_layer_params)")
        plan = ctx.write_at
        pools = (plan.k_pool, plan.v_pool)
        ctx = ctx.replace(write_at=plan.replace(k_pool=None, v_pool=None))
        for i in range(cfg.n_layers):
            x_BTD, pools = block(cfg, deterministic, name=f"layers_{i}")(x_BTD, ctx, (i, *pools))
        return x_BTD, WrittenPools(*pools)


    def _run_layers(self, x_BTD, ctx, kv, deterministic):
        """Hand the stacked layer parameters and a one-layer function to `layer_runner`."""
        cfg = self.cfg
        if kv is not None or not cfg.scan_layers or not deterministic:
            raise ValueError("a layer_runner (pipeline parallelism) needs model.scan_layers=true, no KV cache "
                             "and no dropout (model.dropout=0, model.attention_dropout=0)")

        def block_fn(layer_params, x_BTD, ctx):
            return Block(cfg, deterministic).apply({"params": layer_params}, x_BTD, ctx)[0]

        if cfg.remat != "none":
            block_fn = jax.checkpoint(block_fn, policy=REMAT_POLICIES[cfg.remat])
        return self.layer_runner(block_fn, self.variables["params"]["layers"], x_BTD, ctx)


# ----------------------------------------------------------------------- parameters


def _dummy_tokens(cfg: ModelConfig):
    return jnp.zeros((1, min(8, cfg.max_seq_len)), jnp.int32)


def param_shapes(cfg: ModelConfig):
    """Abstract (ShapeDtypeStruct) parameters, with logical-axis metadata; nothing allocated."""
    model = Transformer(cfg)
    # Shapes do not depend on placement: leave any current mesh's rules out of it.
    with nn.logical_axis_rules(()):
        return jax.eval_shape(lambda: model.init(jax.random.key(0), _dummy_tokens(cfg)))["params"]


def abstract_params(cfg: ModelConfig):
    """`param_shapes` without the logical-axis boxes: plain ShapeDtypeStructs.

    Unboxed outside any mesh's rules, so it works inside `sharding_context` too (unboxing
    under active rules would add sharding constraints to the abstract values).
    """
    with nn.logical_axis_rules(()):
        return nn.unbox(param_shapes(cfg))


def param_logical_axes(cfg: ModelConfig):
    """A tree, shaped like the params, of `PartitionSpec`s of logical axis names."""
    return nn.get_partition_spec(param_shapes(cfg))


def count_params(cfg: ModelConfig) -> int:
    return sum(x.size for x in jax.tree.leaves(abstract_params(cfg)))


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: ModelConfig, rng: jax.Array):
    """Randomly initialised parameters as a plain pytree (logical metadata removed).

    Jitted (one compile per config): initialising op by op is many times slower.
    """
    return nn.unbox(Transformer(cfg).init(rng, _dummy_tokens(cfg))["params"])


def unstack_layer_params(params, n_layers: int):
    """Scanned params (`layers` with a leading L axis) -> unrolled `layers_0..L-1`.

    Quantized weights (dataclass leaves: int8/int4 `QuantizedTensor`, `NF4Tensor`) are
    sliced by their own indexing, which keeps their static axis and shape right."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(n_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked, is_leaf=_sliceable_dataclass)
    return params


# (module, fused projection, the projections it replaces, the kernels' axis to join them on)
_FUSED_PROJECTIONS = (
    ("attention", "qkv", ("query", "key", "value"), -2),  # [D, N, H] + [D, K, H] + [D, K, H] -> [D, N+2K, H]
    ("mlp", "wi_gate_up", ("wi_gate", "wi_up"), -1),  # [D, F] + [D, F] -> [D, 2F]
)


def fuse_projections(params):
    """Every layer's query/key/value kernels joined into one `qkv` kernel, and a gated MLP's
    gate and up kernels into one `wi_gate_up`; `Attention` and `MLP` use them when present.

    For decoding: a batch-1 step is a chain of matrix-vector products, each with a fixed
    cost (~40 us on XLA:CPU) beyond streaming its weights, so five products per layer
    become two. The logits are the same up to float rounding. Stacked (scanned) and
    unrolled layers both work; projections with anything besides a plain kernel and bias
    (LoRA weights, a quantized or NF4 kernel) are left as they are.
    """
    if not isinstance(params, dict):
        return params
    out = {name: fuse_projections(value) for name, value in params.items()}
    for module, fused, parts, axis in _joinable(out):
        tree = out[module]
        joined = {leaf: jnp.concatenate([tree[p][leaf] for p in parts], axis=axis) for leaf in tree[parts[0]]}
        out[module] = {name: value for name, value in tree.items() if name not in parts} | {fused: joined}
    return out


def has_joinable_projections(params) -> bool:
    """Whether `fuse_projections` would join anything (False once it has)."""
    if not isinstance(params, dict):
        return False
    return bool(_joinable(params)) or any(has_joinable_projections(v) for v in params.values())


def _joinable(params: dict) -> list:
    """The entries of _FUSED_PROJECTIONS whose parts this level holds as plain kernels (and biases)."""
    out = []
    for module, fused, parts, axis in _FUSED_PROJECTIONS:
        tree = params.get(module)
        if not isinstance(tree, dict) or not all(_plain_projection(tree.get(p)) for p in parts):
            continue
        if len({frozenset(tree[p]) for p in parts}) != 1:
            continue  # some have a bias and some do not
        out.append((module, fused, parts, axis))
    return out


def _plain_projection(tree) -> bool:
    return (isinstance(tree, dict) and "kernel" in tree and set(tree) <= {"kernel", "bias"}
            and all(isinstance(a, jax.Array) for a in tree.values()))


def _sliceable_dataclass(x) -> bool:
    return dataclasses.is_dataclass(x) and hasattr(type(x), "__getitem__")


def can_unstack_layer_params(params) -> bool:
    """Whether `unstack_layer_params` can slice every leaf (arrays, and dataclass leaves
    such as quantized weights that index their own leading axis)."""
    leaves = jax.tree.leaves(params, is_leaf=dataclasses.is_dataclass)
    return all(not dataclasses.is_dataclass(x) or _sliceable_dataclass(x) for x in leaves)


def stack_layer_params(params, n_layers: int):
    """Unrolled `layers_0..L-1` -> scanned `layers` with a leading L axis."""
    params = dict(params)
    layers = [params.pop(f"layers_{i}") for i in range(n_layers)]
    params["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    return params
