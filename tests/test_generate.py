"""The decoding loop and the samplers."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import ModelConfig
from llm_jax.inference import SamplingParams, filter_logits, generate, prepare_decoding_weights, sample
from llm_jax.models import Transformer, init_params

# A large init makes a random model's next-token choices vary with the context, so that
# a wrong cache, mask or position would change the greedy output.
BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   max_seq_len=64, init_std=0.5)
GREEDY = dict(temperature=0.0)


def _model(**changes):
    cfg = dataclasses.replace(BASE, **changes)
    return cfg, init_params(cfg, jax.random.key(0))


def _is_greedy_continuation(params, cfg, prompt, generated):
    """Every generated token is the argmax of the full forward pass over what precedes it."""
    seq = jnp.asarray([list(prompt) + list(generated)])
    prefix = jnp.arange(seq.shape[1])[None] < len(prompt) if cfg.mask == "prefix" else None
    logits, _ = Transformer(cfg).apply({"params": params}, seq, prefix_mask_BT=prefix)
    predicted = jnp.argmax(logits[0, len(prompt) - 1 : -1], axis=-1)
    return predicted.tolist() == list(generated)


@pytest.mark.parametrize(
    "changes",
    [
        dict(),
        dict(n_kv_heads=1, position="alibi"),
        dict(n_kv_heads=4, position="relative"),
        dict(position="learned", norm="layernorm", activation="gelu", use_bias=True),
        dict(position="sinusoidal", tie_embeddings=False),
        dict(mask="prefix"),
        dict(sliding_window=4),
        dict(scan_layers=False, attention="dot_product"),
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default",
)
def test_greedy_generation_matches_the_full_forward_pass(changes):
    cfg, params = _model(**changes)
    prompt = [3, 17, 5, 9, 22]
    out = generate(params, cfg, [prompt], max_new_tokens=12, sampling=GREEDY)
    assert len(out.tokens[0]) == 12 and out.finish_reasons == ["length"]
    assert _is_greedy_continuation(params, cfg, prompt, out.tokens[0])
    assert len(set(out.tokens[0])) > 1  # the test model does not just repeat one token


def test_weights_prepared_once_decode_alike_and_are_not_prepared_again():
    cfg, params = _model()
    prepared, prepared_cfg = prepare_decoding_weights(params, cfg)
    assert not prepared_cfg.scan_layers and "qkv" in prepared["layers_0"]["attention"]
    again = prepare_decoding_weights(prepared, prepared_cfg)
    assert again[0] is prepared and again[1] == prepared_cfg
    prompts = [[3, 17, 5], [9, 22, 1, 4, 30]]
    for sampling in (GREEDY, dict(temperature=0.8, top_p=0.9)):
        ref = generate(params, cfg, prompts, max_new_tokens=10, sampling=sampling, seed=3)
        assert generate(prepared, prepared_cfg, prompts, max_new_tokens=10, sampling=sampling, seed=3) == ref


def test_padding_never_changes_an_answer():
    cfg, params = _model()
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24], [40]]
    batched = generate(params, cfg, prompts, max_new_tokens=10, sampling=GREEDY)
    for prompt, tokens in zip(prompts, batched.tokens):
        assert generate(params, cfg, [prompt], max_new_tokens=10, sampling=GREEDY).tokens[0] == tokens


def test_stop_sequences_end_a_row_and_are_removed():
    cfg, params = _model()
    free = generate(params, cfg, [[3, 17, 5], [9, 9, 1]], max_new_tokens=12, sampling=GREEDY).tokens
    stop = free[0][4:6]
    out = generate(params, cfg, [[3, 17, 5], [9, 9, 1]], max_new_tokens=12, sampling=GREEDY, stop_sequences=[stop])
    first = next(i for i in range(len(free[0]) - 1) if free[0][i : i + 2] == stop)
    assert out.tokens[0] == free[0][:first] and out.finish_reasons[0] == "stop"
    # The other row is unaffected unless it happens to produce the same pair.
    if not any(free[1][i : i + 2] == stop for i in range(len(free[1]) - 1)):
        assert out.tokens[1] == free[1] and out.finish_reasons[1] == "length"

    single = generate(params, cfg, [[3, 17, 5]], max_new_tokens=12, sampling=GREEDY, stop_tokens=[free[0][2]])
    assert single.tokens[0] == free[0][: free[0].index(free[0][2])]


def test_streaming_yields_the_same_tokens_in_chunks_without_stop_fragments():
    cfg, params = _model()
    plain = generate(params, cfg, [[3, 17, 5]], max_new_tokens=16, sampling=GREEDY).tokens[0]
    stop = plain[10:13]
    expected = plain[: next(i for i in range(14) if plain[i : i + 3] == stop)]
    chunks = []
    out = generate(params, cfg, [[3, 17, 5]], max_new_tokens=16, sampling=GREEDY, stop_sequences=[stop],
                   on_tokens=lambda new: chunks.append(new[0]), stream_interval=3)
    assert sum(chunks, []) == out.tokens[0] == expected
    assert len([c for c in chunks if c]) >= 2


def test_sampling_is_reproducible_for_a_seed():
    cfg, params = _model()
    settings = dict(temperature=1.0, top_k=20, top_p=0.95)
    a = generate(params, cfg, [[1, 2, 3]] * 2, max_new_tokens=16, sampling=settings, seed=7).tokens
    b = generate(params, cfg, [[1, 2, 3]] * 2, max_new_tokens=16, sampling=settings, seed=7).tokens
    c = generate(params, cfg, [[1, 2, 3]] * 2, max_new_tokens=16, sampling=settings, seed=8).tokens
    assert a == b and a != c
    assert a[0] != a[1]  # rows draw independently


def test_a_sampled_row_draws_what_its_prompt_alone_draws_with_seed_plus_its_row():
    """Each row has its own key (row b: seed + b), so a sampled row does not depend on the
    batch around it; prompts may also come as a numpy array."""
    cfg, params = _model()
    settings = dict(temperature=1.0, top_p=0.9, repetition_penalty=1.2)
    prompts = [[1, 2, 3], [7, 8, 9]]
    batched = generate(params, cfg, np.asarray(prompts), max_new_tokens=12, sampling=settings, seed=5).tokens
    alone = [generate(params, cfg, [p], max_new_tokens=12, sampling=settings, seed=5 + b).tokens[0]
             for b, p in enumerate(prompts)]
    assert batched == alone


def test_per_row_settings_in_one_batch():
    cfg, params = _model()
    greedy = generate(params, cfg, [[1, 2, 3]], max_new_tokens=8, sampling=GREEDY).tokens[0]
    mixed = generate(params, cfg, [[1, 2, 3], [1, 2, 3]], max_new_tokens=8,
                     sampling=dict(temperature=[0.0, 1.5]), seed=1).tokens
    assert mixed[0] == greedy and mixed[1] != greedy


# --------------------------------------------------------------------------- samplers


LOGITS = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))


def _kept(**settings):
    return np.isfinite(np.asarray(filter_logits(LOGITS, SamplingParams.make(1, **settings))))[0].tolist()


def test_top_k_top_p_min_p_keep_the_right_tokens():
    assert _kept(top_k=2) == [True, True, False, False, False]
    assert _kept(top_p=0.5) == [True, False, False, False, False]
    assert _kept(top_p=0.8) == [True, True, True, False, False]  # 0.5 + 0.2 < 0.8 needs a third
    assert _kept(top_p=1.0) == [True] * 5
    assert _kept(min_p=0.35) == [True, True, False, False, False]  # p >= 0.35 * 0.5
    assert _kept(top_k=3, top_p=0.6) == [True, True, False, False, False]


def test_sampled_frequencies_follow_the_filtered_distribution():
    sp = SamplingParams.make(20000, top_k=2)
    draws = sample(jnp.broadcast_to(LOGITS, (20000, 5)), jax.random.key(0), sp)
    freq = np.bincount(np.asarray(draws), minlength=5) / 20000
    np.testing.assert_allclose(freq, [5 / 7, 2 / 7, 0, 0, 0], atol=0.015)


def test_temperature_zero_is_argmax_and_low_temperature_approaches_it():
    logits = jax.random.normal(jax.random.key(1), (64, 50))
    greedy = sample(logits, jax.random.key(2), SamplingParams.make(64, temperature=0.0))
    assert (greedy == jnp.argmax(logits, -1)).all()
    cold = sample(logits, jax.random.key(2), SamplingParams.make(64, temperature=1e-3))
    assert (cold == greedy).mean() > 0.95


def test_penalties_discourage_seen_tokens():
    logits = jnp.asarray([[2.0, 1.9, -1.0]])
    counts = jnp.asarray([[1, 0, 0]])
    greedy_rep = SamplingParams.make(1, temperature=0.0, repetition_penalty=1.2)
    assert int(sample(logits, jax.random.key(0), greedy_rep, counts)[0]) == 1
    greedy_pres = SamplingParams.make(1, temperature=0.0, presence_penalty=0.5)
    assert int(sample(logits, jax.random.key(0), greedy_pres, counts)[0]) == 1
    assert int(sample(logits, jax.random.key(0), SamplingParams.make(1, temperature=0.0), counts)[0]) == 0


def test_per_row_keys_draw_what_each_row_draws_alone_whatever_the_others_use():
    """The engine's rows are separate requests: with a key per row, a row's token depends
    only on its own logits, settings and key (a neighbour using top-p sorts the batch; a
    row with top-k and top-p off keeps every token either way)."""
    logits = jax.random.normal(jax.random.key(3), (4, 50)) * 3
    keys = jax.random.split(jax.random.key(4), 4)
    settings = dict(temperature=[1.0, 0.7, 1.0, 0.0], top_p=[1.0, 1.0, 0.9, 1.0], top_k=[0, 5, 0, 0])
    batch = sample(logits, keys, SamplingParams.make(4, **settings))
    for b in range(4):
        alone = sample(logits[b : b + 1], keys[b], SamplingParams.make(1, **{k: v[b] for k, v in settings.items()}))
        assert int(batch[b]) == int(alone[0])
    # Rows 0 and 3 again, now in a batch where no row needs the sort.
    plain = {k: [v[0], v[3]] for k, v in settings.items()}
    again = sample(logits[jnp.array([0, 3])], keys[jnp.array([0, 3])], SamplingParams.make(2, **plain))
    assert again.tolist() == [int(batch[0]), int(batch[3])]


# -------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(prompts=[[1, 2], []]), ["prompts", "empty"]),
        (dict(prompts=[]), ["prompts"]),
        (dict(prompts=[list(range(1, 64)) + [1]]), ["prompts", "context"]),
        (dict(prompts=[[1, 2]], max_new_tokens=70), ["max_new_tokens", "overflows"]),
        (dict(prompts=[[1, 99]]), ["prompts", "outside"]),
        (dict(prompts=[[1]], sampling=dict(top_p=1.5)), ["top_p", "(0, 1]"]),
        (dict(prompts=[[1]], sampling=dict(top_p=0.0)), ["top_p"]),
        (dict(prompts=[[1]], sampling=dict(temperature=-0.5)), ["temperature"]),
        (dict(prompts=[[1]], sampling=dict(tempreature=0.5)), ["tempreature", "temperature"]),
        (dict(prompts=["hello"]), ["tokenizer"]),
        (dict(prompts=[[1]], stop_sequences=[[]]), ["stop_sequences"]),
        (dict(prompts=[[1]], stop_sequences=[[3, -1]]), ["stop_sequences", "outside [0, 64)", "-1"]),
        (dict(prompts=[[1]], stop_tokens=[64]), ["stop_tokens", "outside"]),
        (dict(prompts=[[1]], stop_sequences=["\n"]), ["stop_sequences are strings", "tokenizer"]),
        (dict(prompts=[[1]], max_new_tokens=4.0), ["max_new_tokens must be an integer"]),
        (dict(prompts=[[1]], seed=2**63), ["seed"]),
    ],
)
def test_bad_requests_are_refused_before_compiling(kwargs, words):
    cfg, params = _model()
    prompts = kwargs.pop("prompts")
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError) as e:
        generate(params, cfg, prompts, **kwargs)
    for word in words:
        assert word in str(e.value)


# ------------------------------------------------------------------------- int8 cache


def test_int8_cache_stays_close_to_the_full_precision_cache():
    from llm_jax.models import KVCache

    cfg, params = _model(init_std=0.1)
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(3), (2, 24), 0, cfg.vocab_size)
    full, _ = model.apply({"params": params}, tokens)
    cache = KVCache.init(cfg, 2, 32, int8=True)
    assert cache.k.dtype == jnp.int8 and cache.k_scale.shape == cache.k.shape[:-1]
    apply = jax.jit(lambda tokens, cache: model.apply({"params": params}, tokens, cache=cache))
    prefill, cache = apply(tokens[:, :16], cache)
    steps = [prefill]
    for t in range(16, 24):
        logits, cache = apply(tokens[:, t : t + 1], cache)
        steps.append(logits)
    incremental = jnp.concatenate(steps, axis=1)
    err = float(jnp.abs(incremental - full).max())
    assert 0 < err < 0.02 * float(jnp.abs(full).max())  # quantized, so not exact, but close
    probs = jax.nn.softmax(incremental), jax.nn.softmax(full)
    assert float(jnp.abs(probs[0] - probs[1]).max()) < 0.02


def test_int8_cache_generation_runs_and_mostly_agrees():
    cfg, params = _model(init_std=0.1)
    exact = generate(params, cfg, [[3, 17, 5, 9]], max_new_tokens=12, sampling=GREEDY).tokens[0]
    quant = generate(params, cfg, [[3, 17, 5, 9]], max_new_tokens=12, sampling=GREEDY, int8_cache=True).tokens[0]
    assert len(quant) == 12 and sum(a == b for a, b in zip(exact, quant)) >= 6


def _while_body(hlo: str) -> str:
    """The text of the (single) while loop's body computation in compiled HLO."""
    (body,) = re.findall(r"while\(.*?body=%?([\w.-]+)", hlo)
    start = re.search(rf"^%?{re.escape(body)} .*{{$", hlo, re.M).end()
    return hlo[start : hlo.index("\n}", start)]


@pytest.mark.parametrize("int8", [False, True], ids=["f32-cache", "int8-cache"])
def test_the_decode_loop_writes_the_cache_in_place(int8):
    """No step copies the whole cache or a layer of it: XLA orders the write after every
    layer's read (see Transformer), and a float cache is read per layer as it is laid out."""
    import importlib

    gen = importlib.import_module("llm_jax.inference.generate")
    cfg, params = _model(n_layers=3, n_heads=4, n_kv_heads=2)
    tokens, lengths = gen._check_and_pad(cfg, [[1, 2, 3], [4, 5]], 8)
    state = gen._prefill(params, cfg, tokens, lengths, jax.random.key(0), max_new_tokens=8,
                         cache_len=tokens.shape[1] + 8, stop_window=1, int8_cache=int8)
    params, cfg = gen.prepare_decoding_weights(params, cfg)
    stops = gen._stop_array([], cfg.vocab_size)
    text = gen._decode.lower(params, cfg, state, SamplingParams.make(2, temperature=0.0), stops, 8,
                             greedy=True).compile().as_text()
    L, B, S, K, H = state.cache.k.shape
    dtype = "s8" if int8 else "f32"
    whole = f"= {dtype}[{L},{B},{S},{K},{H}]"
    copies = [line for line in text.splitlines() if whole in line and " copy(" in line]
    assert copies == [], copies[:2]
    if not int8:  # the per-layer arrays of LayerKVCache: [B, K, H, S] keys, [B, K, S, H] values
        body = _while_body(text)
        assert f"f32[{B},{K},{H},{S}]" in body and f"f32[{B},{K},{S},{H}]" in body  # they are in the loop
        layer = [line for line in body.splitlines() if "copy" in line
                 and any(f"f32[{B},{K},{a},{b}]" in line for a, b in ((H, S), (S, H)))]
        assert layer == [], layer[:2]
