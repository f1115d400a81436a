"""Meshes and logical-axis rules on 8 simulated devices: placement, equality, errors."""

import dataclasses

import jax
import numpy as np
import pytest

from llm_jax.config import MeshConfig, ModelConfig
from llm_jax.inference import generate
from llm_jax.models import Transformer, init_params
from llm_jax.parallel import init_sharded_params, make_mesh, mesh_shape, param_shardings, sharding_context

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_seq_len=64, init_std=0.5)


def test_mesh_shape_resolves_the_rest_and_refuses_mismatches():
    assert mesh_shape(MeshConfig(data=-1, tensor=2), 8) == dict(data=4, fsdp=1, tensor=2, pipeline=1)
    with pytest.raises(ValueError, match="multiply to 3, which does not divide the 8 devices"):
        mesh_shape(MeshConfig(data=-1, tensor=3), 8)
    with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
        mesh_shape(MeshConfig(data=2, tensor=2), 8)


def test_sharded_init_places_every_large_parameter_and_matches_plain_init():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = init_sharded_params(CFG, mesh, jax.random.key(0))
    plain = init_params(CFG, jax.random.key(0))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        if a.ndim >= 2:  # matrices are split over fsdp and/or tensor, never fully replicated
            assert not a.sharding.is_fully_replicated, jax.tree_util.keystr(path)
            assert a.addressable_shards[0].data.size < a.size
    query = sharded["layers"]["attention"]["query"]["kernel"]
    assert tuple(query.sharding.spec) == ("pipeline", "fsdp", "tensor", None)  # pipeline size 1 here


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=2, fsdp=2, tensor=2), MeshConfig(data=4, tensor=2),
                                      MeshConfig(fsdp=8, data=1)])
def test_forward_on_a_mesh_equals_one_device(mesh_cfg):
    mesh = make_mesh(mesh_cfg)
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, CFG.vocab_size)
    plain = init_params(CFG, jax.random.key(0))
    expected, _ = Transformer(CFG).apply({"params": plain}, tokens)
    sharded = init_sharded_params(CFG, mesh, jax.random.key(0))
    with sharding_context(mesh):
        logits, _ = jax.jit(lambda p, t: Transformer(CFG).apply({"params": p}, t))(sharded, tokens)
    # Equal up to the order of floating-point reductions: 1e-5 relative to the logits' scale.
    assert np.abs(np.asarray(logits) - np.asarray(expected)).max() <= 1e-5 * np.abs(np.asarray(expected)).max()


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_tensor_parallel_decoding_equals_one_device(n_kv_heads):
    cfg = dataclasses.replace(CFG, n_kv_heads=n_kv_heads)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    expected = generate(init_params(cfg, jax.random.key(0)), cfg, prompts, max_new_tokens=8,
                        sampling=dict(temperature=0.0)).tokens
    mesh = make_mesh(MeshConfig(data=1, tensor=2), devices=jax.devices()[:2])
    sharded = init_sharded_params(cfg, mesh, jax.random.key(0))
    assert sharded["layers"]["attention"]["key"]["kernel"].sharding.spec[2] == "tensor"  # heads are split
    with sharding_context(mesh):
        out = generate(sharded, cfg, prompts, max_new_tokens=8, sampling=dict(temperature=0.0)).tokens
    assert out == expected


def test_an_axis_the_mesh_cannot_divide_is_refused_with_sizes():
    mesh = make_mesh(MeshConfig(data=2, tensor=4))
    with pytest.raises(ValueError, match=r"'kv_heads' of size 2 cannot be split 4 ways"):
        param_shardings(CFG, mesh)
