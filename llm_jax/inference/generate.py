"""Generation: a jitted prefill and a jitted `lax.while_loop` over an explicit KV cache.

    prompts -> right-pad to a bucket -> prefill (one call) -> decode loop (one while_loop)

Rows keep their own lengths in `cache.end`, so a short prompt batched with a long one
gets exactly the tokens it would get alone. Each row also samples with its own key: row b
of a call with `seed` draws what a call with its prompt alone and `seed + b` draws (the
serving engine gives each request its key the same way), whatever else is in the batch.
The loop stops when every row has produced a stop sequence or `max_new_tokens`.
Streaming runs the same loop in chunks of `stream_interval` tokens, so Python is visited
once per chunk, not once per token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Protocol, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.inference.quantize import dequantize_params
from llm_jax.inference.sampling import SamplingParams, sample
from llm_jax.models import (KVCache, LayerKVCache, Transformer, can_unstack_layer_params, fuse_projections,
                            has_joinable_projections, unstack_layer_params)
from llm_jax.models import peft as peft_lib
from llm_jax.models.layers import compute_dtype

_NOT_GENERATED = -1  # in the output buffer: no token (row finished earlier)
_WILDCARD = -1  # in stop sequences: left padding that matches anything
_PROMPT_BUCKET = 16  # prompt lengths are rounded up to limit recompilation


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    logits: jax.Array  # [B, V] logits for the next token
    tokens: jax.Array  # [B, N] generated ids; _NOT_GENERATED after a row finished
    step: jax.Array  # [] tokens generated so far
    done: jax.Array  # [B] row finished
    stop_len: jax.Array  # [B] length of the stop sequence that finished the row, 0 if none
    recent: jax.Array  # [B, M] the last M generated tokens, for matching stop sequences
    counts: jax.Array  # [B, V] occurrences in prompt + output, for the penalties
    key: jax.Array  # generate: [B], one random key per row (speculative decoding keeps one)


@dataclasses.dataclass(frozen=True)
class Generation:
    """What `generate` returns, one entry per prompt."""

    tokens: list[list[int]]  # generated ids, stop sequence removed
    finish_reasons: list[str]  # "stop" or "length"
    texts: list[str] | None = None  # decoded, when a tokenizer was given


def _prompt_pass(params, cfg: ModelConfig, tokens_BP, lengths_B, cache: KVCache):
    """One pass over right-padded prompts into an empty cache, as `generate` and beam search
    begin: (each row's next-token logits [B, V], the cache holding the prompts with `end`
    at each row's length, the in-prompt mask [B, P]). Quantized weights are dequantized."""
    in_prompt_BP = jnp.arange(tokens_BP.shape[1])[None, :] < lengths_B[:, None]
    prefix = in_prompt_BP if cfg.mask == "prefix" else None
    weights = dequantize_params(params, compute_dtype(cfg))
    logits_B1V, cache = Transformer(cfg).apply({"params": weights}, tokens_BP, prefix_mask_BT=prefix, cache=cache,
                                               logits_at_B=lengths_B - 1)
    # The padding slots past a row's length get overwritten by its generated tokens.
    return logits_B1V[:, 0], cache.replace(end=lengths_B), in_prompt_BP


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "cache_len", "stop_window", "int8_cache"))
def _prefill(params, cfg: ModelConfig, tokens_BP, lengths_B, key, *, max_new_tokens, cache_len, stop_window,
             int8_cache=False):
    B = tokens_BP.shape[0]
    logits_BV, cache, in_prompt_BP = _prompt_pass(params, cfg, tokens_BP, lengths_B,
                                                 KVCache.init(cfg, B, cache_len, int8=int8_cache))
    counts = jnp.zeros((B, cfg.vocab_size), jnp.int32).at[jnp.arange(B)[:, None], tokens_BP].add(in_prompt_BP)
    return DecodeState(
        cache=cache,
        logits=logits_BV,
        tokens=jnp.full((B, max_new_tokens), _NOT_GENERATED, jnp.int32),
        step=jnp.zeros((), jnp.int32),
        done=jnp.zeros((B,), bool),
        stop_len=jnp.zeros((B,), jnp.int32),
        recent=jnp.full((B, stop_window), -2, jnp.int32),
        counts=counts,
        key=key,
    )


def _match_stop(recent_BM, stops_SM):
    """Length of the longest stop sequence that the recent tokens end with, else 0."""
    hit_BS = jnp.all((stops_SM[None] == _WILDCARD) | (recent_BM[:, None, :] == stops_SM[None]), axis=-1)
    lengths_S = jnp.sum(stops_SM != _WILDCARD, axis=-1)
    return jnp.max(jnp.where(hit_BS, lengths_S[None], 0), axis=-1, initial=0)


def _is_greedy(sp: SamplingParams) -> bool:
    """Every row greedy with no penalties: `sample` then reduces to an argmax (checked on the host)."""
    temperature, rep, presence = jax.device_get((sp.temperature, sp.repetition_penalty, sp.presence_penalty))
    return bool(np.all(temperature == 0) and np.all(rep == 1) and np.all(presence == 0))


def prepare_decoding_weights(params, cfg: ModelConfig):
    """(params, cfg) as the prefill and the decode loop read them; `generate` and `stream`
    do this on every call unless given weights already prepared.

    - The layer stack unrolled (`scan_layers=False`): each step of a scanned stack slices
      (copies) every layer's weights out of the stacked arrays before its matmuls, which
      triples the weight traffic of a memory-bound step. Quantized weights unroll as they
      are, and their slices stay quantized (int8, 30M parameters, two CPU cores: 23.5 ->
      87 tokens/s at batch 1).
    - On a single device, each layer's q/k/v and gate/up kernels joined
      (`fuse_projections`); on a mesh the joined kernels would mix differently split heads.

    Either copies the weights (one jitted call: ~30 ms for 32M parameters on two CPU
    cores). Preparing them once and passing the result to every `generate` call saves that
    per call, at the price of holding the copy beside the original (or in its place: the
    prepared weights are all that decoding needs). A streamed generation, which runs the
    loop once per `stream_interval` tokens, prepares them once either way.
    """
    plain = all(not dataclasses.is_dataclass(x) for x in jax.tree.leaves(params, is_leaf=dataclasses.is_dataclass))
    unroll = cfg.scan_layers and can_unstack_layer_params(params)
    fuse = (plain and has_joinable_projections(params)
            and all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(params) if hasattr(x, "sharding")))
    if not (unroll or fuse):
        return params, cfg
    return _prepare_weights(params, cfg, unroll, fuse), dataclasses.replace(cfg, scan_layers=False) if unroll else cfg


@functools.partial(jax.jit, static_argnames=("cfg", "unroll", "fuse"))
def _prepare_weights(params, cfg: ModelConfig, unroll: bool, fuse: bool):
    params = unstack_layer_params(params, cfg.n_layers) if unroll else params
    return fuse_projections(params) if fuse else params


@functools.partial(jax.jit, static_argnames=("cfg", "greedy"), donate_argnames=("state",))
def _decode(params, cfg: ModelConfig, state: DecodeState, sp: SamplingParams, stops_SM, until_step,
            greedy: bool = False):
    """Decode until `until_step` or every row is done, from `prepare_decoding_weights`' weights.
    `greedy=True` (see `_is_greedy`) takes the argmax directly: no sort, no draw, and no
    penalty counts (they stay as they were)."""
    model = Transformer(cfg)
    # Unrolled layers over a float cache decode from one array per layer, each laid out for
    # the attention products (see LayerKVCache); copied in and back once per call.
    per_layer = not cfg.scan_layers and state.cache.k_scale is None and not peft_lib.prompt_rows(cfg)
    if per_layer:
        state = state.replace(cache=LayerKVCache.from_cache(state.cache))
    rows = jnp.arange(state.done.shape[0])

    def cond(s: DecodeState):
        return (s.step < until_step) & ~jnp.all(s.done)

    def body(s: DecodeState):
        if greedy:  # no draw, so the keys stay as they are
            key, next_B = s.key, jnp.argmax(s.logits, axis=-1).astype(jnp.int32)
        else:  # each row splits its own key, as a batch of one would
            key, draw_B = jax.vmap(jax.random.split, out_axes=1)(s.key)
            next_B = sample(s.logits, draw_B, sp, s.counts)
        token_B = jnp.where(s.done, _NOT_GENERATED, next_B)
        live_B = ~s.done
        recent = jnp.concatenate([s.recent[:, 1:], token_B[:, None]], axis=1)
        stop_len = jnp.where(live_B, _match_stop(recent, stops_SM), s.stop_len)
        feed_B = jnp.where(live_B, token_B, 0)
        # Inside the loop, so quantized weights stay quantized in memory between steps.
        weights = dequantize_params(params, compute_dtype(cfg))
        logits, cache = model.apply({"params": weights}, feed_B[:, None], cache=s.cache)
        return s.replace(
            cache=cache,
            logits=logits[:, 0],
            tokens=s.tokens.at[:, s.step].set(token_B),
            step=s.step + 1,
            done=s.done | (stop_len > 0),
            stop_len=stop_len,
            recent=recent,
            counts=s.counts if greedy else s.counts.at[rows, feed_B].add(live_B.astype(jnp.int32)),
            key=key,
        )

    state = jax.lax.while_loop(cond, body, state)
    return state.replace(cache=state.cache.to_cache()) if per_layer else state


def row_keys(seed: int, batch: int) -> jax.Array:
    """[batch] random keys, row b's `jax.random.key(seed + b)`: a row draws what it would
    draw alone with that seed."""
    if not isinstance(seed, (int, np.integer)) or not -(2**63) <= int(seed) <= 2**63 - batch:
        raise ValueError(f"seed must be an integer that fits in 64 signed bits (with one more per row), got {seed!r}")
    data = np.stack([np.asarray(jax.random.key_data(jax.random.key(int(seed) + b))) for b in range(batch)])
    return jax.random.wrap_key_data(data)


def _check_and_pad(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int):
    if isinstance(prompts, (np.ndarray, jax.Array)):
        prompts = [list(row) for row in np.asarray(prompts)]
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool):
        raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if len(prompts) == 0:
        raise ValueError("prompts: no prompts given")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompts: prompt {lengths.index(0)} is empty; every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(lengths)
    if longest >= cfg.max_seq_len:
        raise ValueError(f"prompts: a prompt of {longest} tokens does not fit the context of {cfg.max_seq_len}")
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} overflows the cache: the longest prompt ({longest} tokens) plus "
            f"new tokens exceeds model.max_seq_len={cfg.max_seq_len}; at most {cfg.max_seq_len - longest} fit"
        )
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompts: prompt {i} has token ids outside [0, {cfg.vocab_size}): {bad[:5]}")
    bucket = min(-(-longest // _PROMPT_BUCKET) * _PROMPT_BUCKET, cfg.max_seq_len - max_new_tokens)
    padded = np.zeros((len(prompts), bucket), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    return jnp.asarray(padded), jnp.asarray(lengths, jnp.int32)


def _stop_array(stop_sequences: Sequence[Sequence[int]], vocab_size: int) -> np.ndarray:
    """Stop sequences right-aligned in an [S, M] array, left-padded with the wildcard."""
    seqs = [list(s) for s in stop_sequences]
    if any(len(s) == 0 for s in seqs):
        raise ValueError("stop_sequences: an empty stop sequence would stop at once")
    bad = [t for s in seqs for t in s if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"stop_sequences / stop_tokens: token ids outside [0, {vocab_size}): {bad[:5]}")
    width = max([len(s) for s in seqs], default=1)
    out = np.full((len(seqs), width), _WILDCARD, np.int32)
    for i, s in enumerate(seqs):
        out[i, width - len(s) :] = s
    return out


def stream(
    params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    sampling: SamplingParams | dict | None = None,
    stop_sequences: Sequence[Sequence[int]] = (),
    seed: int = 0,
    stream_interval: int = 8,
    int8_cache: bool = False,
) -> Iterator[tuple[list[list[int]], DecodeState]]:
    """Yield each row's newly final tokens every `stream_interval` steps, then the state.

    `params` may be quantized (`llm_jax.inference.quantize.quantize_params`).
    Tokens that might still turn out to begin a stop sequence are held back until they
    cannot, so a consumer never sees any part of a stop sequence.
    """
    tokens_BP, lengths_B = _check_and_pad(cfg, prompts, max_new_tokens)
    B = len(prompts)
    if not isinstance(sampling, SamplingParams):
        sampling = SamplingParams.make(B, **(sampling or {}))
    if stream_interval < 1:
        raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
    stops = _stop_array(stop_sequences, cfg.vocab_size)
    cache_len = tokens_BP.shape[1] + max_new_tokens
    params, cfg = prepare_decoding_weights(params, cfg)
    state = _prefill(
        params, cfg, tokens_BP, lengths_B, row_keys(seed, B),
        max_new_tokens=max_new_tokens, cache_len=cache_len, stop_window=stops.shape[1], int8_cache=int8_cache,
    )
    emitted = [0] * B
    hold_back = stops.shape[1] - 1
    greedy = _is_greedy(sampling)
    until = 0
    while True:
        until = min(until + stream_interval, max_new_tokens)
        state = _decode(params, cfg, state, sampling, stops, until, greedy=greedy)
        tokens, done, stop_len = jax.device_get((state.tokens, state.done, state.stop_len))
        finished = bool(done.all()) or int(state.step) >= max_new_tokens
        new = []
        for b in range(B):
            row = tokens[b][tokens[b] != _NOT_GENERATED]
            safe = len(row) - stop_len[b] if (done[b] or finished) else max(len(row) - hold_back, emitted[b])
            new.append(row[emitted[b] : safe].tolist())
            emitted[b] = max(emitted[b], safe)
        yield new, state
        if finished:
            return


def generate(
    params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]] | Sequence[str],
    *,
    max_new_tokens: int = 64,
    sampling: SamplingParams | dict | None = None,
    stop_sequences: Sequence[Sequence[int]] | Sequence[str] = (),
    stop_tokens: Sequence[int] = (),
    tokenizer: Tokenizer | None = None,
    seed: int = 0,
    on_tokens: Callable[[list[list[int]]], None] | None = None,
    stream_interval: int = 8,
    int8_cache: bool = False,
) -> Generation:
    """Generate continuations of token-id prompts (or of strings, given a tokenizer).

    `sampling` is a `SamplingParams` or a dict of its settings (temperature 0 is greedy).
    `on_tokens`, if given, receives each row's new tokens every `stream_interval` steps;
    without it the whole generation runs as a single jitted loop. `int8_cache` stores
    keys and values as int8 with per-token, per-head scales (half the cache memory of bf16).
    """
    if isinstance(prompts, (np.ndarray, jax.Array)):
        prompts = [list(row) for row in np.asarray(prompts)]
    if len(prompts) and isinstance(prompts[0], str):
        if tokenizer is None:
            raise ValueError("prompts are strings: pass a tokenizer, or give token ids")
        prompts = [tokenizer.encode(p) for p in prompts]
    if tokenizer is None and any(isinstance(s, str) for s in stop_sequences):
        raise ValueError("stop_sequences are strings: pass a tokenizer, or give token ids")
    stops = [tokenizer.encode(s) if isinstance(s, str) else list(s) for s in stop_sequences]
    stops += [[t] for t in stop_tokens]
    interval = stream_interval if on_tokens is not None else max_new_tokens
    out: list[list[int]] = [[] for _ in prompts]
    for new, state in stream(
        params, cfg, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
        stop_sequences=stops, seed=seed, stream_interval=interval, int8_cache=int8_cache,
    ):
        for row, toks in zip(out, new):
            row.extend(toks)
        if on_tokens is not None:
            on_tokens(new)
    reasons = ["stop" if s > 0 else "length" for s in jax.device_get(state.stop_len)]
    texts = [tokenizer.decode(t) for t in out] if tokenizer is not None else None
    return Generation(tokens=out, finish_reasons=reasons, texts=texts)
