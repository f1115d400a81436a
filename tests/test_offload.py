"""Host offloading: the optimizer state in pinned host memory, activations offloaded by remat.

jaxlib's CPU backend has a `pinned_host` memory kind, so the supported path runs here;
the unsupported path is a backend whose devices lack one.
"""

import dataclasses

import jax
import numpy as np
import pytest

from llm_jax.config import ConfigError, MeshConfig, ModelConfig, OptimConfig
from llm_jax.parallel import make_mesh, param_shardings, sharding_context
from llm_jax.parallel.offload import HOST, OffloadUnsupported, check_host_offload
from llm_jax.training.step import _accumulated_grads, init_sharded_train_state, sharded_train_step

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16)
OPTIM = OptimConfig(lr=1e-2, warmup_steps=1)


def _batch(seed=0):
    tokens = (np.random.default_rng(seed).integers(0, 64, (8, 1)) + np.arange(17)) % 64
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}


def _train(offload_optimizer: bool, steps: int = 2):
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with sharding_context(mesh):
        state = init_sharded_train_state(CFG, OPTIM, 10, jax.random.key(0), mesh, param_shardings(CFG, mesh),
                                         offload_optimizer=offload_optimizer)
        step = sharded_train_step(state, rows, model_cfg=CFG)
        losses = []
        for i in range(steps):
            state, metrics = step(state, jax.device_put(_batch(i), rows))
            losses.append(float(metrics["loss"]))
    return losses, state


def test_offloaded_optimizer_state_stays_on_host_and_trains_the_same():
    reference, _ = _train(offload_optimizer=False)
    losses, state = _train(offload_optimizer=True)
    np.testing.assert_allclose(losses, reference, rtol=1e-6)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim >= 2]
    assert moments and all(x.sharding.memory_kind == HOST for x in moments)
    assert all(x.sharding.memory_kind != HOST for x in jax.tree.leaves(state.params))
    # Still split like its parameter, only in another memory.
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in moments)


@dataclasses.dataclass
class _Memory:
    kind: str


@dataclasses.dataclass
class _DeviceWithoutHostMemory:
    platform: str = "fakegpu"
    id: int = 3

    def addressable_memories(self):
        return [_Memory("device")]


def test_offload_is_refused_where_the_backend_has_no_host_memory():
    check_host_offload(jax.devices())  # the CPU backend has one
    with pytest.raises(OffloadUnsupported, match=r"fakegpu device 3 offers only \['device'\]"):
        check_host_offload([_DeviceWithoutHostMemory()])


def test_offload_remat_policy_matches_no_remat_and_moves_activations_to_host():
    from llm_jax.models import init_params

    offloaded = dataclasses.replace(CFG, remat="offload_attention_mlp_out")
    batch, key = _batch(), jax.random.key(0)
    params = init_params(CFG, key)
    grad_fns = {cfg.remat: jax.jit(lambda p, b, cfg=cfg: _accumulated_grads(p, b, key, cfg, 1, 0.0)[0])
                for cfg in (CFG, offloaded)}
    reference, got = (jax.device_get(grad_fns[name](params, batch)) for name in ("none", offloaded.remat))
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # CPU memory is host memory, so XLA:CPU drops the placement; lowered for a GPU or a TPU
    # (no device needed), the saved activations are placed in pinned host memory.
    for platform in ("cuda", "tpu"):
        exported = jax.export.export(grad_fns[offloaded.remat], platforms=[platform])(params, batch)
        assert '_xla_buffer_placement = "pinned_host"' in exported.mlir_module()
    plain = jax.export.export(grad_fns["none"], platforms=["cuda"])(params, batch)
    assert "pinned_host" not in plain.mlir_module()


def test_unknown_remat_policy_names_the_choices():
    with pytest.raises(ConfigError, match="offload_attention_mlp_out"):
        ModelConfig(remat="offload_everything")
