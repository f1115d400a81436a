"""Weight-only int8 / int4 quantization."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import ModelConfig
from llm_jax.inference import generate, prepare_decoding_weights
from llm_jax.inference.quantize import (
    QuantizedTensor,
    dequantize_params,
    params_nbytes,
    quantize_params,
    quantize_tensor,
)
from llm_jax.models import Transformer, init_params, unstack_layer_params
from llm_jax.models.lora import quantize_nf4

CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                  max_seq_len=64, tie_embeddings=False, init_std=0.1)


@pytest.mark.parametrize("bits, group", [(8, None), (8, 16), (4, None), (4, 16)])
def test_rounding_error_is_at_most_half_a_step(bits, group):
    w = jax.random.normal(jax.random.key(0), (3, 64, 5))
    q = quantize_tensor(w, bits, axis=1, group_size=group)
    w_hat = q.dequantize()
    assert w_hat.shape == w.shape
    step = np.asarray(jnp.moveaxis(jnp.broadcast_to(q.scale, q.values.shape).reshape(3, 5, 64), -1, 1))
    assert np.all(np.abs(np.asarray(w_hat - w)) <= step / 2 + 1e-6)
    assert q.values.dtype == (jnp.int8 if bits == 8 else jnp.int4)


def test_a_stacked_quantized_weight_unstacks_into_its_layers():
    """`unstack_layer_params` slices a QuantizedTensor as a whole (static axis and shape follow)."""
    params = init_params(CFG, jax.random.key(0))
    q = quantize_params(params, CFG, bits=4, group_size=16)
    whole = jax.jit(dequantize_params)(q)
    layers = jax.jit(dequantize_params)(unstack_layer_params(q, CFG.n_layers))
    for i in range(CFG.n_layers):
        for a, b in zip(jax.tree.leaves(layers[f"layers_{i}"]), jax.tree.leaves(whole["layers"])):
            np.testing.assert_array_equal(a, b[i])
    with pytest.raises(ValueError, match="leading axis"):
        quantize_tensor(jnp.ones((4, 8)), 8, axis=0)[0]
    nf4 = quantize_nf4(jax.random.normal(jax.random.key(1), (2, 32, 8)), axis=1, group_size=16)  # QLoRA's
    np.testing.assert_array_equal(nf4[1].dequantize(), nf4.dequantize()[1])


def test_every_matrix_is_quantized_along_its_contraction_axis():
    params = init_params(CFG, jax.random.key(0))
    q = quantize_params(params, CFG, bits=8)
    attn = q["layers"]["attention"]
    # q/k/v contract over embed (axis 1 after layers); out over head_dim; MLP out over mlp.
    assert attn["query"]["kernel"].axis == 1 and attn["out"]["kernel"].axis == 2
    assert q["layers"]["mlp"]["wo"]["kernel"].axis == 1
    assert q["embed"]["embedding"].axis == 1 and q["unembed"]["kernel"].axis == 0
    assert not isinstance(q["final_norm"]["scale"], QuantizedTensor)
    assert params_nbytes(q) < 0.3 * params_nbytes(params)
    q4 = quantize_params(params, CFG, bits=4, group_size=32)
    assert params_nbytes(q4) < params_nbytes(q)


def test_quantized_model_stays_close_and_groups_help_int4():
    params = init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, CFG.vocab_size)
    model = Transformer(CFG)

    def logit_error(qparams):
        """Mean absolute change of the next-token log-probabilities."""
        out, _ = model.apply({"params": dequantize_params(qparams)}, tokens)
        ref, _ = model.apply({"params": params}, tokens)
        return float(jnp.abs(jax.nn.log_softmax(out) - jax.nn.log_softmax(ref)).mean())

    int8 = logit_error(quantize_params(params, CFG, bits=8))
    int4 = logit_error(quantize_params(params, CFG, bits=4))
    int4_grouped = logit_error(quantize_params(params, CFG, bits=4, group_size=16))
    assert int8 < 0.02
    assert int8 < int4_grouped < int4 < 0.5


def test_generate_accepts_quantized_params():
    params = init_params(CFG, jax.random.key(0))
    q = quantize_params(params, CFG, bits=8)
    exact = generate(params, CFG, [[5, 6, 7]], max_new_tokens=8, sampling=dict(temperature=0.0)).tokens[0]
    quant = generate(q, CFG, [[5, 6, 7]], max_new_tokens=8, sampling=dict(temperature=0.0)).tokens[0]
    reference_logits, _ = Transformer(CFG).apply({"params": dequantize_params(q)}, jnp.asarray([[5, 6, 7] + quant]))
    # Greedy under the quantized weights is exactly what the dequantized model predicts.
    assert jnp.argmax(reference_logits[0, 2:-1], -1).tolist() == quant
    assert len(exact) == len(quant) == 8
    # Prepared for decoding, the stack is unrolled and its weights stay int8.
    prepared, prepared_cfg = prepare_decoding_weights(q, CFG)
    assert not prepared_cfg.scan_layers and prepared["layers_1"]["mlp"]["wo"]["kernel"].values.dtype == jnp.int8
    again = generate(prepared, prepared_cfg, [[5, 6, 7]], max_new_tokens=8, sampling=dict(temperature=0.0))
    assert again.tokens[0] == quant


def test_bad_settings_are_refused():
    params = init_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match="bits"):
        quantize_params(params, CFG, bits=3)
    with pytest.raises(ValueError, match="group_size=48.*contraction size 64"):
        quantize_params(params, CFG, bits=4, group_size=48)
    for bad in (0, -8, 8.5):
        with pytest.raises(ValueError, match="group_size must be a positive integer"):
            quantize_params(params, CFG, bits=4, group_size=bad)
