"""Losses, schedules, optimizers and the train step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import ModelConfig, OptimConfig
from llm_jax.training import (
    cross_entropy_loss,
    eval_step,
    init_train_state,
    learning_rate_schedule,
    train_step,
)

CFG = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)


def _batch(batch=4, length=16, seed=1):
    tokens = jax.random.randint(jax.random.key(seed), (batch, length + 1), 0, CFG.vocab_size)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def test_cross_entropy_with_mask_and_z_loss():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    targets = jnp.asarray([[0, 1, 2], [3, 4, 0]])
    mask = jnp.asarray([[1, 1, 0], [1, 0, 0]])
    log_probs = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    expected = (nll * mask).sum() / 3
    loss, metrics = cross_entropy_loss(logits, targets, mask)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(metrics["tokens"]) == 3
    log_z = jax.nn.logsumexp(logits, -1)
    with_z, _ = cross_entropy_loss(logits, targets, mask, z_loss=1e-2)
    np.testing.assert_allclose(with_z, expected + 1e-2 * (log_z**2 * mask).sum() / 3, rtol=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_warms_up_then_decays_to_the_floor(schedule):
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg, total_steps=100)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(100)), 1e-4, rtol=1e-5)
    assert 1e-4 < float(lr(55)) < 1e-3
    constant = learning_rate_schedule(dataclasses.replace(cfg, schedule="constant"), 100)
    np.testing.assert_allclose(float(constant(80)), 1e-3, rtol=1e-6)
    with pytest.raises(ValueError, match="warmup_steps=10"):
        learning_rate_schedule(cfg, total_steps=10)


def test_gradient_accumulation_equals_the_whole_batch():
    batch = _batch(batch=8)
    # Uneven masks: each microbatch holds a different number of tokens.
    batch["loss_mask"] = (jnp.arange(16)[None, :] < jnp.arange(2, 18, 2)[:, None]).astype(jnp.float32)
    results = []
    for microbatches in (1, 4):
        state = init_train_state(CFG, OptimConfig(lr=1e-2, warmup_steps=0), 10, jax.random.key(0))
        for _ in range(2):
            state, metrics = train_step(state, batch, model_cfg=CFG, microbatches=microbatches)
        results.append((state.params, metrics))
    (p1, m1), (p4, m4) = results
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, atol=1e-5)  # Adam divides by tiny second moments


def test_non_finite_steps_are_skipped_and_counted():
    state = init_train_state(CFG, OptimConfig(lr=1e-2, warmup_steps=0), 10, jax.random.key(0))
    before = jax.tree.map(np.asarray, state.params)
    poisoned = dict(_batch(), loss_mask=jnp.full((4, 16), jnp.nan))
    for expected_in_a_row in (1, 2):
        state, metrics = train_step(state, poisoned, model_cfg=CFG)
        assert float(metrics["skipped"]) == 1 and int(state.bad_in_a_row) == expected_in_a_row
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    state, metrics = train_step(state, _batch(), model_cfg=CFG)
    assert int(state.skipped) == 2 and int(state.bad_in_a_row) == 0 and int(state.step) == 3
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


@pytest.mark.parametrize("name, lr", [("adamw", 1e-2), ("adafactor", 1e-2), ("lion", 3e-3)])
def test_each_optimizer_learns_to_memorise_a_batch(name, lr):
    batch = _batch()
    state = init_train_state(CFG, OptimConfig(name=name, lr=lr, warmup_steps=2, weight_decay=0.0), 40,
                             jax.random.key(0))
    first = float(eval_step(state.params, batch, model_cfg=CFG)["loss_sum"])
    for _ in range(40):
        state, _ = train_step(state, batch, model_cfg=CFG)
    last = float(eval_step(state.params, batch, model_cfg=CFG)["loss_sum"])
    assert last < 0.5 * first


def test_weight_decay_spares_vectors():
    # A fully masked batch has zero gradients, so AdamW's update is weight decay alone.
    state = init_train_state(CFG, OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.5, grad_clip=None), 10,
                             jax.random.key(0))
    before = jax.tree.map(np.asarray, state.params)
    state, _ = train_step(state, dict(_batch(), loss_mask=jnp.zeros((4, 16))), model_cfg=CFG)
    after = state.params
    assert not np.allclose(after["layers"]["mlp"]["wo"]["kernel"], before["layers"]["mlp"]["wo"]["kernel"])
    np.testing.assert_array_equal(after["final_norm"]["scale"], before["final_norm"]["scale"])


def test_bf16_compute_keeps_f32_master_weights_and_tracks_f32():
    batch = _batch()
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = dataclasses.replace(CFG, dtype=dtype)
        state = init_train_state(cfg, OptimConfig(lr=1e-2, warmup_steps=0), 10, jax.random.key(0))
        for _ in range(3):
            state, metrics = train_step(state, batch, model_cfg=cfg)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
        losses[dtype] = float(metrics["loss"])
    assert losses["bfloat16"] != losses["float32"]
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.05 * losses["float32"]


def test_dropout_draws_fresh_masks_each_step():
    cfg = dataclasses.replace(CFG, dropout=0.3)
    state = init_train_state(cfg, OptimConfig(lr=1e-9, warmup_steps=0), 10, jax.random.key(0))
    state, m1 = train_step(state, _batch(), model_cfg=cfg)
    state, m2 = train_step(state, _batch(), model_cfg=cfg)
    assert float(m1["loss"]) != float(m2["loss"])  # same batch, ~same params, different masks
