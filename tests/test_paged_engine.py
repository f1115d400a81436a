"""The paged KV cache, the page pool and the continuous-batching engine."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import ModelConfig
from llm_jax.inference import generate
from llm_jax.inference.engine import Engine, EngineConfig, RequestError, _decode_kernel
from llm_jax.inference.quantize import quantize_params
from llm_jax.inference.paged_cache import PagePool, page_keys
from llm_jax.models import KVCache, Transformer, init_params, unstack_layer_params
from llm_jax.models.paged import PagedKVCache

# A large init makes the random model's choices depend on the context (see test_generate.py).
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
                  init_std=0.5, dtype="float32")
# One engine config for every test (few compiles). 14 pages of 4 tokens are too few for
# four requests of up to 30 tokens at once: the pool runs out and preempts.
ENGINE = EngineConfig(max_batch=4, page_size=4, num_pages=15, prefill_chunk=8, prefill_rows=2)
RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(0, 64, n).tolist() for n in (3, 20, 9, 1, 12)]  # two prompt buckets in generate
SETTINGS = [dict(temperature=0.0), dict(temperature=1.0, top_k=10), dict(temperature=0.8, top_p=0.9,
            repetition_penalty=1.3), dict(temperature=1.2, min_p=0.05, presence_penalty=0.5), dict(temperature=1.0)]


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def reference(params):
    """What `generate` gives each prompt alone (batch of one), with its own seed and a stop token."""
    return [generate(params, CFG, [p], max_new_tokens=10, sampling=s, stop_tokens=[5], seed=i).tokens[0]
            for i, (p, s) in enumerate(zip(PROMPTS, SETTINGS))]


def _run(params, config, **submit):
    engine = Engine(params, CFG, config)
    requests = [engine.submit(p, max_tokens=10, sampling=s, stop_sequences=[[5]], seed=i, **submit)
                for i, (p, s) in enumerate(zip(PROMPTS, SETTINGS))]
    engine.run_until_idle()
    return engine, requests


@jax.jit
def _apply(params, tokens_BT, cache):
    return Transformer(CFG).apply({"params": params}, tokens_BT, cache=cache)


def _decode_step_by_step(params, cache, tokens_BT, first):
    """Prefill `first` tokens, then feed the rest one at a time; all logits [B, T, V]."""
    logits, cache = _apply(params, tokens_BT[:, :first], cache)
    out = [logits]
    for t in range(first, tokens_BT.shape[1]):
        logits, cache = _apply(params, tokens_BT[:, t : t + 1], cache)
        out.append(logits)
    return jnp.concatenate(out, axis=1)


def test_paged_decoding_equals_the_dense_cache_and_the_full_forward(params):
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, CFG.vocab_size)
    full, _ = Transformer(CFG).apply({"params": params}, tokens)
    dense = _decode_step_by_step(params, KVCache.init(CFG, 2, CFG.max_seq_len), tokens, first=7)
    # Scattered, interleaved pages: row 0 and row 1 take pages from all over the pool.
    k, v = PagedKVCache.init_pool(CFG, num_pages=32, page_size=4)
    pages = np.random.default_rng(0).permutation(np.arange(1, 32))
    table = np.zeros((2, 8), np.int32)
    table[0, :4], table[1, :4] = pages[:4], pages[4:8]
    cache = PagedKVCache(k=k, v=v, page_table=jnp.asarray(table), end=jnp.zeros(2, jnp.int32))
    paged = _decode_step_by_step(params, cache, tokens, first=7)
    np.testing.assert_allclose(paged, dense, atol=1e-5, rtol=0)
    np.testing.assert_allclose(paged, full, atol=1e-5, rtol=1e-5)


def test_pallas_kernel_steps_equal_the_gather_path_and_the_full_forward(params):
    """kernel='pallas': each one-token step reads the pages through JAX's Pallas GPU kernel
    (in interpret mode on a CPU), each layer writing its key and value first; the prefill
    gathers. Grouped-query heads, pages scattered over the pool, rows of different lengths."""
    cfg = dataclasses.replace(CFG, scan_layers=False)
    unrolled = unstack_layer_params(params, CFG.n_layers)
    apply = jax.jit(lambda p, tokens, cache: Transformer(cfg).apply({"params": p}, tokens, cache=cache))
    tokens = jnp.asarray(RNG.integers(0, 64, (2, 20)))
    table = np.zeros((2, 8), np.int32)
    table[0, :5], table[1, :6] = [3, 7, 1, 9, 2], [4, 5, 6, 8, 10, 11]
    out = {}
    for kernel in ("gather", "pallas"):
        k, v = PagedKVCache.init_pool(CFG, num_pages=12, page_size=4)
        cache = PagedKVCache(k=k, v=v, page_table=jnp.asarray(table), end=jnp.asarray([0, 3]), kernel=kernel)
        logits, cache = apply(unrolled, tokens[:, :7], cache)
        steps = [logits]
        for t in range(7, 20):
            logits, cache = apply(unrolled, tokens[:, t : t + 1], cache)
            steps.append(logits)
        out[kernel] = jnp.concatenate(steps, axis=1), cache
    np.testing.assert_allclose(out["pallas"][0], out["gather"][0], atol=3e-5, rtol=1e-5)
    np.testing.assert_allclose(out["pallas"][1].k, out["gather"][1].k, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(out["pallas"][1].end, [20, 23])
    # Row 0 started empty: its logits are the full forward's.
    full = Transformer(cfg).apply({"params": unrolled}, tokens[:1])[0]
    np.testing.assert_allclose(out["pallas"][0][0], full[0], atol=3e-5, rtol=1e-5)


def test_the_pallas_kernel_step_needs_unrolled_layers_and_no_position_bias(params):
    k, v = PagedKVCache.init_pool(CFG, num_pages=12, page_size=4)
    cache = PagedKVCache(k=k, v=v, page_table=jnp.ones((1, 8), jnp.int32), end=jnp.asarray([3]), kernel="pallas")
    with pytest.raises(ValueError, match="model.scan_layers=false"):
        Transformer(CFG).apply({"params": params}, jnp.ones((1, 1), jnp.int32), cache=cache)
    with pytest.raises(ValueError, match="kernel must be one of"):
        PagedKVCache(k=k, v=v, page_table=cache.page_table, end=cache.end, kernel="flash")
    with pytest.raises(ValueError, match="model.position='alibi'"):
        Engine(params, dataclasses.replace(CFG, position="alibi"),
               dataclasses.replace(ENGINE, paged_attention="pallas"))
    with pytest.raises(ValueError, match="paged_attention must be"):
        dataclasses.replace(ENGINE, paged_attention="triton")
    assert Engine(params, CFG, ENGINE).kernel == "gather"  # "auto" on a CPU


def test_paged_cache_refuses_non_causal_models():
    with pytest.raises(ValueError, match="mask='prefix'"):
        PagedKVCache.init_pool(dataclasses.replace(CFG, mask="prefix"), 8, 4)


def test_page_pool_reference_counts_prefix_cache_and_eviction():
    pool = PagePool(num_pages=4, page_size=2)  # pages 1..3
    a, b = pool.allocate(), pool.allocate()
    keys = page_keys([1, 2, 3, 4, 5], 2)
    assert len(keys) == 2 and page_keys([1, 2, 9, 9], 2)[0] == keys[0] and page_keys([1, 2, 9, 9], 2)[1] != keys[1]
    pool.register(a, keys[0])
    pool.register(b, keys[1])
    assert pool.lookup(keys) == [a, b]  # shared: ref count 2
    pool.release([a, b])
    assert pool.in_use() == 2 and pool.available() == 1
    pool.release([a, b])
    assert pool.in_use() == 0 and pool.available() == 3  # cached pages count as available
    c = pool.allocate()
    assert c not in (a, b)  # the free page goes first
    d = pool.allocate()
    assert d == a and pool.lookup(keys) == []  # then the least recently used cached page is evicted
    assert pool.allocate() == b and pool.allocate() is None
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([c, c])


def test_engine_gives_each_request_what_generate_gives_it_alone(params, reference):
    """Greedy and sampled rows, a stop token, penalties, mixed lengths, chunked prefill, preemption."""
    engine, requests = _run(params, ENGINE)
    assert [r.output for r in requests] == reference
    assert {r.finish_reason for r in requests} == {"stop", "length"}
    assert engine.stats["preemptions"] > 0  # ... and the preempted requests resumed exactly
    assert requests[0].preemptions == 0  # the oldest request is never the one preempted
    snap = engine.snapshot()
    assert snap["pages_in_use"] == 0 and snap["running"] == 0 and snap["waiting"] == 0
    assert snap["pages_available"] == ENGINE.num_pages - 1  # every page came back


def test_prefill_chunks_wider_than_the_smallest_page_tables_or_the_context(params, reference):
    """Pages of 2 tokens and chunks of 64 in a 32-token context: a call's page table always
    covers its width, and no chunk is wider than the context (both crashed before)."""
    config = dataclasses.replace(ENGINE, page_size=2, num_pages=80, prefill_chunk=64)
    engine = Engine(params, CFG, config)
    assert engine._prefill_widths() == [16, 32]
    # What warm-up compiles (it crashed on the 4- and 8-page tables of a 16- or 32-token chunk).
    assert engine._page_buckets(16) == [8, 16] and engine._page_buckets(32) == [16]
    requests = [engine.submit(p, max_tokens=10, sampling=s, stop_sequences=[[5]], seed=i)
                for i, (p, s) in enumerate(zip(PROMPTS, SETTINGS))]
    engine.run_until_idle()
    assert [r.output for r in requests] == reference


def test_an_engine_on_the_pallas_kernel_gives_each_request_what_generate_gives_it(params, reference):
    """The same requests (preemption included) with decode steps through the Pallas kernel.
    Pages of 3 tokens: 11 cover the context, and the kernel's calls get power-of-two
    tables of up to 16 (padded with null pages)."""
    engine, requests = _run(params, dataclasses.replace(ENGINE, page_size=3, num_pages=20, paged_attention="pallas"))
    assert engine.kernel == "pallas" and not engine.cfg.scan_layers  # the engine unrolled the weights
    assert engine._page_buckets(1) == [4, 8, 16] and engine._page_buckets(8) == [4, 8, 11]
    assert [r.output for r in requests] == reference
    assert engine.stats["preemptions"] > 0


def test_the_pallas_kernel_engine_serves_quantized_weights(params):
    """int8 weights: the engine unrolls the stacked QuantizedTensors layer by layer."""
    quantized = quantize_params(params, CFG, bits=8)
    outputs = {}
    for kernel in ("gather", "pallas"):
        engine = Engine(quantized, CFG, dataclasses.replace(ENGINE, paged_attention=kernel))
        # Two short prompts: few shapes to compile.
        requests = [engine.submit(p, max_tokens=4, sampling=dict(temperature=0.0)) for p in (PROMPTS[0], PROMPTS[2])]
        engine.run_until_idle()
        outputs[kernel] = [r.output for r in requests]
    assert outputs["pallas"] == outputs["gather"] and all(len(o) == 4 for o in outputs["gather"])


def test_the_kernel_decode_call_lowers_to_triton_for_a_cuda_gpu(monkeypatch):
    """No GPU here, but the Pallas-to-Triton lowering runs on any machine: the engine's
    decode call, for every page-table width it compiles, lowers for CUDA (bfloat16, GQA)."""
    from llm_jax.inference import engine as engine_lib

    cfg = dataclasses.replace(CFG, d_model=128, max_seq_len=200, dtype="bfloat16")  # head_dim 32
    engine = Engine(init_params(cfg, jax.random.key(0)), cfg,
                    EngineConfig(max_batch=4, page_size=16, num_pages=40, paged_attention="pallas"))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # compile the kernel, do not interpret it
    for n_pages in engine._page_buckets(1):
        inputs = engine._call_inputs([], engine.config.max_batch, 1, n_pages)
        lowered = engine_lib._forward.trace(*engine._forward_args(inputs)).lower(lowering_platforms=("cuda",))
        assert "triton" in lowered.as_text()


def test_auto_picks_the_kernel_only_on_a_cuda_gpu_for_shapes_it_can_compile(monkeypatch):
    """The rule alone (no GPU here): power-of-two head_dim and page_size of at least 16."""
    class Client:
        platform_version = "cuda 12040"

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda: [type("Device", (), {"client": Client})()])
    wide = dataclasses.replace(CFG, d_model=128)  # head_dim 32
    auto = dataclasses.replace(ENGINE, page_size=16)
    assert _decode_kernel(wide, auto) == "pallas"
    assert _decode_kernel(CFG, auto) == "gather"  # head_dim 8
    assert _decode_kernel(wide, dataclasses.replace(auto, page_size=48)) == "gather"
    assert _decode_kernel(dataclasses.replace(wide, position="alibi"), auto) == "gather"
    with pytest.raises(ValueError, match="powers of two >= 16.*head_dim=8"):
        _decode_kernel(CFG, dataclasses.replace(auto, paged_attention="pallas"))
    Client.platform_version = "rocm 60300"
    assert _decode_kernel(wide, auto) == "gather"


def test_submitting_sends_nothing_to_the_device(params):
    """`submit` runs on the server's event loop, which must not dispatch JAX work; the
    request's key is made on the engine's thread, and it gets the same tokens."""
    engine = Engine(params, CFG, ENGINE)
    with jax.transfer_guard("disallow"):
        request = engine.submit(PROMPTS[0], max_tokens=4, sampling=SETTINGS[1], seed=7)
    engine.run_until_idle()
    alone = generate(params, CFG, [PROMPTS[0]], max_new_tokens=4, sampling=SETTINGS[1], seed=7)
    assert request.output == alone.tokens[0]


def test_prefix_cache_reuses_the_pages_of_a_shared_prompt(params):
    shared = RNG.integers(0, 64, 13).tolist()
    engine = Engine(params, CFG, ENGINE)
    first = engine.submit(shared + [1], max_tokens=10, sampling=dict(temperature=0.0), stop_sequences=[[5]])
    engine.run_until_idle()
    second = engine.submit(shared + [2], max_tokens=10, sampling=dict(temperature=0.0), stop_sequences=[[5]])
    engine.run_until_idle()
    assert engine.pool.prefix_hits == 13 // ENGINE.page_size  # three full pages of the common prefix
    assert engine.stats["prefill_tokens"] == 14 + (14 - 12)  # the second fed only what was not cached
    for r, last in ((first, 1), (second, 2)):
        expected = generate(params, CFG, [shared + [last]], max_new_tokens=10, sampling=dict(temperature=0.0),
                            stop_tokens=[5])
        assert r.output == expected.tokens[0]


def test_chunked_prefill_lets_running_requests_decode_meanwhile(params):
    engine = Engine(params, CFG, ENGINE)
    short = engine.submit([1, 2, 3], max_tokens=8, sampling=dict(temperature=0.0))
    engine.step()  # the short prompt is in, decoding
    long = engine.submit(RNG.integers(0, 64, 24).tolist(), max_tokens=4, sampling=dict(temperature=0.0))
    steps_to_prefill = 0
    while long.n_cached < 24 - 1:
        before = len(short.output)
        engine.step()
        steps_to_prefill += 1
        assert len(short.output) == before + 1 or short.finish_reason  # never stalled by the long prompt
    assert steps_to_prefill >= 24 // ENGINE.prefill_chunk
    engine.run_until_idle()
    assert len(long.output) == 4


def test_streaming_updates_hold_back_a_possible_stop_sequence(params, reference):
    pieces = []
    engine = Engine(params, CFG, ENGINE)
    request = engine.submit(PROMPTS[1], max_tokens=10, sampling=SETTINGS[1], seed=1, stop_sequences=[[5], [9, 9, 9]],
                            on_update=lambda r, tokens, done: pieces.append((list(tokens), done)))
    engine.run_until_idle()
    assert sum((t for t, _ in pieces), []) == request.output
    assert [done for _, done in pieces][-1] and not any(done for _, done in pieces[:-1])


def test_abort_frees_the_pages_of_a_running_request(params):
    engine = Engine(params, CFG, ENGINE)
    request = engine.submit(PROMPTS[1], max_tokens=10)
    for _ in range(6):
        engine.step()
    assert engine.pool.in_use() > 0
    engine.abort(request)
    engine.step()
    assert request.finish_reason == "abort" and request.done.is_set() and engine.pool.in_use() == 0


@pytest.mark.parametrize("submit, message", [
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt=[1, 99]), r"outside \[0, 64\)"),
    (dict(prompt=[1], max_tokens=0), "max_tokens must be"),
    (dict(prompt=[1] * 30, max_tokens=10), "context of 32"),
    (dict(prompt=[1], sampling=dict(top_p=0)), "top_p"),
    (dict(prompt=[1], sampling=dict(beam=2)), "unknown sampling settings"),
    (dict(prompt=[1], sampling=dict(top_k=2**31)), r"top_k: must be in \[0, 2\*\*31\)"),
    (dict(prompt=[1], sampling=dict(presence_penalty=float("nan"))), "presence_penalty: must be finite"),
    (dict(prompt=[1], seed=2**63), "seed must be an integer that fits in 64 signed bits"),
])
def test_engine_refuses_bad_requests_with_a_message(params, submit, message):
    engine = Engine(params, CFG, ENGINE)
    with pytest.raises(RequestError, match=message):
        engine.submit(**submit)


def test_a_request_larger_than_the_pool_is_refused_not_hung(params):
    engine = Engine(params, CFG, dataclasses.replace(ENGINE, num_pages=5))
    with pytest.raises(RequestError, match="can never fit the KV-cache pool of 4 pages x 4 tokens"):
        engine.submit([1] * 10, max_tokens=10)
    assert not engine.has_work()
