"""Parameter-efficient tuning: identity at init, decoding, training only the tuned half,
LoRA merge/unmerge, QLoRA's quantization error, sharding of the new parameters, bad targets."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax.config import ConfigError, MeshConfig, ModelConfig, OptimConfig, PeftConfig, override
from llm_jax.finetune import peft
from llm_jax.finetune import step as ft_step
from llm_jax.inference import generate
from llm_jax.models import KVCache, Transformer, abstract_params
from llm_jax.models.lora import NF4_MAX_ERROR, NF4Tensor, quantize_nf4
from llm_jax.parallel.mesh import make_mesh
from llm_jax.parallel.rules import param_shardings
from llm_jax.training.optimizer import make_optimizer
from llm_jax.training.step import TrainState

# init_std 0.5: a random model whose greedy choices depend on the context, so a wrong cache,
# position or mask would show.
BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                   init_std=0.5)
METHODS = ["lora", "qlora", "prefix", "ptuning_v2", "prompt", "ptuning", "adapter"]
# One of each mechanism: trained key/value prefixes (through an MLP) and soft-prompt rows.
PROMPT_LIKE = ["prefix", "ptuning"]


def _cfg(method, **peft_fields):
    fields = dict(method=method, n_virtual=4, lora_targets="all", qlora_group_size=16) | peft_fields
    return dataclasses.replace(BASE, peft=PeftConfig(**fields))


def random_params(cfg, std=0.5, seed=0):
    """Base weights drawn with NumPy: the same role as `init_params`, without its compile."""
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):  # norm scales
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(one, abstract_params(cfg))


@pytest.fixture(scope="module")
def base_params():
    return random_params(BASE)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, 12), 0, BASE.vocab_size)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens_BT):
    return Transformer(cfg).apply({"params": params}, tokens_BT)[0]


@functools.partial(jax.jit, static_argnums=0)
def _cached(cfg, params, tokens_BT, cache):
    return Transformer(cfg).apply({"params": params}, tokens_BT, cache=cache)


@functools.partial(jax.jit, static_argnums=1)
def _perturbed(tuned, scale):
    """Tuned parameters moved away from their identity init (e.g. LoRA's B = 0, the gates = 0)."""
    leaves, tree = jax.tree.flatten(tuned)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("method", METHODS)
def test_each_method_starts_as_the_base_model(method, base_params, tokens):
    cfg = _cfg(method)
    tuned, frozen = peft.attach(base_params, cfg, jax.random.key(2))
    assert jax.tree.leaves(tuned), "the method added no parameters"
    # QLoRA's base is the NF4-quantized one: compare against it dequantized.
    base = peft.combine({}, jax.tree.map(lambda w: w.dequantize() if isinstance(w, NF4Tensor) else w, frozen,
                                         is_leaf=lambda w: isinstance(w, NF4Tensor)))
    expected = _forward(BASE, base, tokens)
    np.testing.assert_allclose(_forward(cfg, peft.combine(tuned, frozen), tokens), expected, atol=1e-5)
    # ... and is not inert: moving its parameters changes the outputs.
    moved = _forward(cfg, peft.combine(_perturbed(tuned, 0.3), frozen), tokens)
    assert float(jnp.abs(moved - expected).max()) > 1e-2


def test_disabled_peft_leaves_the_parameter_tree_alone():
    off = dataclasses.replace(BASE, peft=PeftConfig(method="none", lora_rank=4, n_virtual=3))
    assert abstract_params(off) == abstract_params(BASE)


@pytest.mark.parametrize("method", PROMPT_LIKE)
def test_prefix_and_prompt_tuning_decode_like_the_full_forward(method, base_params, tokens):
    """Prefill + one-token steps against the KV cache give the logits of one full pass."""
    cfg = _cfg(method)
    tuned, frozen = peft.attach(base_params, cfg, jax.random.key(2))
    params = peft.combine(_perturbed(tuned, 0.3), frozen)
    full = _forward(cfg, params, tokens)
    logits, cache = _cached(cfg, params, tokens[:, :8], KVCache.init(cfg, 2, 16))
    steps = [logits]
    for t in range(8, 12):
        logits, cache = _cached(cfg, params, tokens[:, t : t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-4)


def test_prompt_tuned_model_generates_its_greedy_continuation(base_params):
    cfg = _cfg("ptuning")
    tuned, frozen = peft.attach(base_params, cfg, jax.random.key(2))
    params = peft.combine(_perturbed(tuned, 1.0), frozen)
    prompt = [5, 9, 3, 17, 2]
    out = generate(params, cfg, [prompt], max_new_tokens=6, sampling={"temperature": 0.0}).tokens[0]
    seq = jnp.asarray([prompt + out])
    predicted = jnp.argmax(_forward(cfg, params, seq)[0, len(prompt) - 1 : -1], axis=-1)
    assert predicted.tolist() == out


def _batch(seed=3, B=8, T=16):
    toks = jax.random.randint(jax.random.key(seed), (B, T + 1), 0, BASE.vocab_size)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


# One optimizer for every train-state here: the step is compiled per optimizer object.
OPTIMIZER = make_optimizer(OptimConfig(lr=3e-2, warmup_steps=0, schedule="constant"), 100)


def _state(tuned):
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  separate buffers: the step donates the state
    return TrainState(step=zero(), params=tuned, opt_state=OPTIMIZER.init(tuned), rng=jax.random.key(0),
                      skipped=zero(), bad_in_a_row=zero(), tx=OPTIMIZER)


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_training_changes_only_the_tuned_parameters(method, base_params):
    cfg = _cfg(method)
    tuned, frozen = peft.attach(base_params, cfg, jax.random.key(2))
    frozen_before = jax.tree.map(np.asarray, frozen)
    tuned_before = jax.tree.map(np.asarray, tuned)
    state = ft_step.init_state(tuned, OptimConfig(warmup_steps=1), 10, jax.random.key(0))
    # Optimizer moments exist for the tuned half alone (Adam: two per parameter).
    n_tuned = sum(x.size for x in jax.tree.leaves(tuned))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0) == 2 * n_tuned
    state = _state(tuned)
    for _ in range(3):
        state, metrics = ft_step.train_step(state, frozen, _batch(), model_cfg=cfg)
    assert np.isfinite(float(metrics["loss"]))
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(before, np.asarray(after))
    changed = [not np.allclose(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(tuned_before),
                                                                  jax.tree.leaves(state.params))]
    assert all(changed), "every tuned parameter should move"


def test_training_lowers_the_loss_with_lora(base_params):
    cfg = _cfg("lora")
    tuned, frozen = peft.attach(base_params, cfg, jax.random.key(2))
    state, batch, losses = _state(tuned), _batch(), []
    for _ in range(15):
        state, metrics = ft_step.train_step(state, frozen, batch, model_cfg=cfg)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5


def test_tuned_only_optimizer_gives_frozen_leaves_no_state_or_update(base_params):
    cfg = _cfg("lora")
    tuned, frozen = peft.attach(base_params, cfg, jax.random.key(2))
    params = peft.combine(tuned, frozen)
    tx = peft.tuned_only(optax.adam(1e-2), cfg)

    @jax.jit
    def init_and_step(params):
        opt_state = tx.init(params)
        updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
        return opt_state, optax.apply_updates(params, updates)

    opt_state, new_params = init_and_step(params)
    n_tuned = sum(x.size for x in jax.tree.leaves(tuned))
    assert sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0) == 2 * n_tuned
    new_tuned, new_frozen = peft.split(new_params, cfg)
    assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(new_frozen), jax.tree.leaves(frozen)))
    assert not any(bool((a == b).all()) for a, b in zip(jax.tree.leaves(new_tuned), jax.tree.leaves(tuned)))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merged_lora_equals_unmerged_and_unmerges(method, base_params, tokens):
    cfg = _cfg(method)
    tuned, frozen = peft.attach(base_params, cfg, jax.random.key(2))
    tuned = _perturbed(tuned, 0.3)
    params = peft.combine(tuned, frozen)
    plain_cfg = peft.merge_lora(params, cfg)[0]
    assert plain_cfg.peft.method == "none"
    merged = jax.jit(lambda p: peft.merge_lora(p, cfg)[1])(params)
    assert jax.tree.structure(merged) == jax.tree.structure(base_params)
    np.testing.assert_allclose(_forward(plain_cfg, merged, tokens), _forward(cfg, params, tokens), atol=1e-4)
    if method == "lora":
        restored = jax.jit(lambda m, t: peft.unmerge_lora(m, t, cfg))(merged, tuned)
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(base_params)):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_qlora_quantization_error_is_bounded(base_params):
    w = np.asarray(jax.random.normal(jax.random.key(4), (2, 64, 4, 8)))  # [L, D, N, H]: contraction over D
    q = jax.jit(lambda w: quantize_nf4(w, 1, 16))(w)
    assert q.codes.shape == w.shape and q.codes.dtype == jnp.uint4 and q.scale.shape == (2, 4, 4, 8)
    # Slicing a leading (layer) axis, as the layer scan does, keeps the tensor consistent.
    whole, first = jax.jit(lambda q: (q.dequantize(), jax.tree.map(lambda x: x[0], q).dequantize()))(q)
    np.testing.assert_array_equal(first, whole[0])
    err = np.abs(np.asarray(whole) - w)
    bound = np.repeat(np.asarray(q.scale), 16, axis=1) * NF4_MAX_ERROR
    assert (err <= bound + 1e-6).all()
    assert np.sqrt(np.mean(err**2)) / np.sqrt(np.mean(w**2)) < 0.12  # ~4-bit accuracy
    # Every projection kernel of the base is quantized; embeddings and norms are not.
    frozen = jax.eval_shape(lambda p: peft.quantize_base(p, _cfg("qlora")), base_params)
    kinds = {"/".join(k): type(v).__name__ for k, v in peft._flat(frozen).items()}
    assert kinds["layers/attention/query/kernel"] == "NF4Tensor" and kinds["layers/mlp/wo/kernel"] == "NF4Tensor"
    assert kinds["embed/embedding"] == "ShapeDtypeStruct" and kinds["final_norm/scale"] == "ShapeDtypeStruct"


def test_peft_parameters_carry_logical_axes_for_the_mesh():
    cfg = dataclasses.replace(_cfg("lora"), d_ff=64)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    shardings = peft._flat(param_shardings(cfg, mesh))
    # A factor is split like the side of the kernel it adapts; the rank axis never is.
    assert tuple(shardings[("layers", "attention", "query", "lora", "a")].spec) == ("pipeline", "fsdp", None)
    assert tuple(shardings[("layers", "attention", "query", "lora", "b")].spec) == ("pipeline", None, "tensor", None)
    assert tuple(shardings[("layers", "mlp", "wo", "lora", "b")].spec) == ("pipeline", None, "fsdp")
    prefix = peft._flat(param_shardings(_cfg("ptuning_v2"), mesh))
    assert tuple(prefix[("layers", "attention", "prefix", "key")].spec) == ("pipeline", None, "tensor", None)


def test_lora_target_that_names_no_module_lists_the_modules():
    with pytest.raises(ConfigError, match="'qkv' names no module.*query, key, value, out, wi_gate, wi_up, wo"):
        override(BASE, ["peft.method=lora", "peft.lora_targets=query,qkv"])
    with pytest.raises(ConfigError, match="model.peft.method='bitfit' is not allowed"):
        PeftConfig(method="bitfit")


def test_count_tuned_is_a_small_fraction():
    n_tuned, n_total = peft.count_tuned(_cfg("lora", lora_targets="query,value", lora_rank=2))
    # query: D x r + r x (N H), value: D x r + r x (K H), per layer.
    expected = BASE.n_layers * (32 * 2 + 2 * 32 + 32 * 2 + 2 * 16)
    assert n_tuned == expected and n_total > 10 * n_tuned


def test_lora_dropout_applies_in_training_only(base_params):
    plain = _cfg("lora")
    cfg = _cfg("lora", lora_dropout=0.5)  # the same parameters as `plain`'s
    tuned, frozen = peft.attach(base_params, plain, jax.random.key(2))
    tuned, batch = _perturbed(tuned, 0.3), _batch()
    loss = jax.jit(lambda rng: ft_step.summed_loss(tuned, frozen, batch, rng, cfg)[0])
    evaluate = jax.jit(lambda: ft_step.summed_loss(tuned, frozen, batch, None, cfg)[0])
    assert float(loss(jax.random.key(0))) != float(loss(jax.random.key(1)))  # a new mask per rng
    np.testing.assert_allclose(float(evaluate()), float(_forward_loss(plain, tuned, frozen, batch)), rtol=1e-5)


def _forward_loss(cfg, tuned, frozen, batch):
    """The summed loss without dropout, from the plain forward pass."""
    logits = _forward(cfg, peft.combine(tuned, frozen), batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).sum()
