"""Training on a mesh equals training on one device: data, FSDP/ZeRO, tensor, pipeline.

Three optimizer steps on 8 simulated CPU devices, for a matrix of mesh shapes, must give
the single-device losses, gradients and parameters within 1e-5 relative (f32).
"""

import dataclasses

import jax
import numpy as np
import pytest

from llm_jax.config import MeshConfig, ModelConfig, OptimConfig
from llm_jax.parallel import make_mesh, param_shardings, sharding_context
from llm_jax.parallel.pipeline import PipelineSchedule, pipeline_runner
from llm_jax.training.step import _accumulated_grads, init_sharded_train_state, init_train_state, sharded_train_step

# 8 layers, 8 heads, 8 kv heads and widths divisible by 8, so every axis can be split 8 ways.
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=64, max_seq_len=32)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=1)
STEPS = 3


def _batches():
    key = jax.random.key(7)
    out = []
    for _ in range(STEPS):
        key, sub = jax.random.split(key)
        # Counting sequences from random offsets: learnable, so three steps lower the loss.
        offsets = np.asarray(jax.random.randint(sub, (8, 1), 0, CFG.vocab_size))
        tokens = (offsets + np.arange(17)) % CFG.vocab_size
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    return out


def _run(mesh_cfg: MeshConfig | None, microbatches: int = 1):
    """Losses of three steps, gradients before and after them, and the final state (None: one device)."""
    devices = jax.devices() if mesh_cfg else jax.devices()[:1]
    mesh = make_mesh(mesh_cfg or MeshConfig(data=1), devices=devices)
    cfg = dataclasses.replace(CFG)
    runner = pipeline_runner(mesh, mesh_cfg or MeshConfig(), cfg.n_layers, 8 // microbatches)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with sharding_context(mesh):
        state = init_sharded_train_state(cfg, OPTIM, 10, jax.random.key(0), mesh, param_shardings(cfg, mesh),
                                         shard_params=(mesh_cfg or MeshConfig()).shard_params)
        step = sharded_train_step(state, batch_sharding, model_cfg=cfg, microbatches=microbatches,
                                  layer_runner=runner)
        grads_fn = jax.jit(lambda p, b: _accumulated_grads(p, b, jax.random.key(0), cfg, 1, 0.0, runner)[0])
        batches = [jax.device_put(b, batch_sharding) for b in _batches()]
        grads = [jax.device_get(grads_fn(state.params, batches[0]))]
        losses = []
        for batch in batches:
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        grads.append(jax.device_get(grads_fn(state.params, batches[0])))
    return losses, grads, state


@pytest.fixture(scope="module")
def single_device():
    losses, grads, state = _run(None)
    return losses, grads, jax.device_get(state.params)


def _close(a, b, rtol=1e-5):
    """Equal within `rtol` relative to each array's scale (reduction order differs by layout)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert np.abs(x - y).max() <= rtol * max(np.abs(y).max(), 1e-6)


MESHES = {
    "data8": MeshConfig(data=8),
    "fsdp8": MeshConfig(data=1, fsdp=8),
    "tensor8": MeshConfig(data=1, tensor=8),
    "2x2x2": MeshConfig(data=2, fsdp=2, tensor=2),
    "zero1_fsdp4_tensor2": MeshConfig(data=1, fsdp=4, tensor=2, shard_params=False),
    "pipeline8_gpipe": MeshConfig(data=1, pipeline=8, pipeline_microbatches=8),
    "2x1x2x2_gpipe": MeshConfig(data=2, tensor=2, pipeline=2),
    "1x2x2x2_circular": MeshConfig(data=1, fsdp=2, tensor=2, pipeline=2, pipeline_schedule="circular",
                                   pipeline_repeats=2, pipeline_microbatches=4),
    "2x1x1x4_circular": MeshConfig(data=2, pipeline=4, pipeline_schedule="circular", pipeline_repeats=2),
}


@pytest.mark.parametrize("name", list(MESHES))
def test_three_steps_on_a_mesh_equal_one_device(name, single_device):
    losses, grads, state = _run(MESHES[name])
    ref_losses, ref_grads, ref_params = single_device
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _close(grads, ref_grads)
    # Adam divides by the gradients' running RMS, which magnifies 1e-7-sized differences in
    # near-zero gradients; the parameters agree to 1e-4 of their scale.
    _close(jax.device_get(state.params), ref_params, rtol=1e-4)
    assert ref_losses[-1] < ref_losses[0] - 0.1  # the steps did something


def test_microbatches_on_a_mesh_equal_one_device(single_device):
    losses, _, state = _run(MeshConfig(data=2, fsdp=2, tensor=2), microbatches=2)
    np.testing.assert_allclose(losses, single_device[0], rtol=1e-5)
    _close(jax.device_get(state.params), single_device[2], rtol=1e-4)


def _split_ways(array) -> int:
    return array.size // array.addressable_shards[0].data.size


def test_fsdp_really_shards_params_and_optimizer_state():
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    state = init_sharded_train_state(CFG, OPTIM, 10, jax.random.key(0), mesh, param_shardings(CFG, mesh))
    big = [x for x in jax.tree.leaves((state.params, state.opt_state)) if x.size >= 1024]
    assert len(big) >= 3 * len(jax.tree.leaves(state.params)) // 2  # params + two Adam moments of the big ones
    for x in big:
        assert _split_ways(x) == 8, (x.shape, x.sharding.spec)


def test_zero1_keeps_params_whole_and_splits_only_the_optimizer_state():
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    state = init_sharded_train_state(CFG, OPTIM, 10, jax.random.key(0), mesh, param_shardings(CFG, mesh),
                                     shard_params=False)
    for p in jax.tree.leaves(state.params):
        assert p.sharding.is_fully_replicated
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.size >= 1024]
    assert moments and all(_split_ways(x) == 8 for x in moments)
    # The step keeps that layout instead of letting the update re-split the parameters.
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with sharding_context(mesh):
        step = sharded_train_step(state, batch_sharding, model_cfg=CFG)
        state, _ = step(state, jax.device_put(_batches()[0], batch_sharding))
    assert all(p.sharding.is_fully_replicated for p in jax.tree.leaves(state.params))


def test_plain_init_matches_sharded_init():
    plain = init_train_state(CFG, OPTIM, 10, jax.random.key(0))
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = init_sharded_train_state(CFG, OPTIM, 10, jax.random.key(0), mesh, param_shardings(CFG, mesh))
    _close(jax.device_get(sharded.params), jax.device_get(plain.params))


def test_pipeline_layers_live_on_their_stage():
    mesh = make_mesh(MeshConfig(data=2, pipeline=4))
    state = init_sharded_train_state(CFG, OPTIM, 10, jax.random.key(0), mesh, param_shardings(CFG, mesh))
    kernel = state.params["layers"]["attention"]["query"]["kernel"]
    assert kernel.sharding.spec[0] == "pipeline" and kernel.addressable_shards[0].data.shape[0] == 2


def test_bubble_fractions_and_schedule_errors():
    gpipe, circular = PipelineSchedule(4, 8), PipelineSchedule(4, 8, repeats=2)
    assert gpipe.bubble_fraction == 3 / 11 and circular.bubble_fraction == 3 / 19
    with pytest.raises(ValueError, match="n_layers=6 cannot be cut into 4 pipeline stages x 1 repeats"):
        gpipe.check(6, 8)
    with pytest.raises(ValueError, match="batch of 6 rows cannot be split into 8"):
        gpipe.check(8, 6)
    with pytest.raises(ValueError, match="at least as many microbatches"):
        PipelineSchedule(4, 2, repeats=2).check(8, 8)
