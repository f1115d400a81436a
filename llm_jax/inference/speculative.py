"""Speculative decoding: a small draft model proposes, the target model verifies.

Exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023). Each round:

    draft:   feed the last kept token x, then propose d_1..d_K one at a time (own cache)
    target:  one forward pass over [x, d_1..d_K] gives its distributions p_1..p_{K+1}
    accept:  d_i with probability min(1, p_i(d_i) / q_i(d_i)), stopping at the first reject
    then:    on a reject at i, draw from normalize(max(0, p_i - q_i)); if all K were
             accepted, draw the bonus token from p_{K+1}

so every kept token follows the target's distribution exactly, whatever the draft. Both
p and q are the *filtered* distributions (`filter_logits`: temperature, top-k, top-p,
min-p), and greedy rows (temperature 0) use one-hot argmax distributions, which makes
greedy output identical to the target's own greedy `generate`.

Invariant between rounds: both caches hold every kept token except the last one, which
is fed again at the start of the next round; `end` is per row, so rolling a cache back
after a rejection is just setting `end` (stale slots past it are invisible and get
overwritten). The whole generation, both prefills included, is one jitted call around
one `lax.while_loop` over rounds.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.inference.generate import _check_and_pad, _prefill
from llm_jax.inference.quantize import dequantize_params
from llm_jax.inference.sampling import SamplingParams, filter_logits
from llm_jax.models import KVCache, Transformer
from llm_jax.models.layers import compute_dtype

_NOT_GENERATED = -1  # in the output buffer: no token


@dataclasses.dataclass(frozen=True)
class SpeculativeResult:
    """What `speculative_generate` returns."""

    tokens: list[list[int]]  # generated ids per prompt, stop token removed
    acceptance_rate: float  # accepted draft tokens / proposed draft tokens
    target_calls: int  # target forward passes: the prompt prefill plus one per round


@flax.struct.dataclass
class _RoundState:
    target_cache: KVCache
    draft_cache: KVCache
    last: jax.Array  # [B] last kept token, not yet in either cache
    tokens: jax.Array  # [B, N] generated ids, _NOT_GENERATED past each row's count
    count: jax.Array  # [B] tokens kept so far
    done: jax.Array  # [B] row finished (stop token or max_new_tokens)
    accepted: jax.Array  # [] draft tokens accepted, over all rows and rounds
    proposed: jax.Array  # [] draft tokens proposed to rows still generating
    rounds: jax.Array  # [] verification passes of the target
    key: jax.Array


def _probs(logits_BV, sp: SamplingParams):
    """The distribution a row samples from: one-hot argmax if greedy, else the filtered softmax."""
    greedy_BV = jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), logits_BV.shape[-1])
    sampled_BV = jax.nn.softmax(filter_logits(logits_BV, sp), axis=-1)
    return jnp.where((sp.temperature > 0)[:, None], sampled_BV, greedy_BV)


def _draw(key, probs_BV):
    # log(0) = -inf: filtered-out tokens (and all but the argmax of greedy rows) are never drawn.
    return jax.random.categorical(key, jnp.log(probs_BV), axis=-1).astype(jnp.int32)


def _propose(params, cfg: ModelConfig, cache: KVCache, last_B, sp, key, n_draft: int):
    """Draft tokens [B, K] and the draft distributions they were drawn from [B, K, V]."""
    model = Transformer(cfg)
    params = dequantize_params(params, compute_dtype(cfg))  # quantized weights stay so between rounds

    def step(carry, step_key):
        cache, token_B = carry
        logits_B1V, cache = model.apply({"params": params}, token_B[:, None], cache=cache)
        q_BV = _probs(logits_B1V[:, 0], sp)
        next_B = _draw(step_key, q_BV)
        return (cache, next_B), (next_B, q_BV)

    (cache, last_draft_B), (drafts_KB, q_KBV) = jax.lax.scan(
        step, (cache, last_B), jax.random.split(key, n_draft)
    )
    # Feed d_K as well (its logits are unused) so that, if the target accepts all K,
    # the draft cache already holds every kept token and needs no catching up.
    _, cache = model.apply({"params": params}, last_draft_B[:, None], cache=cache)
    return drafts_KB.T, jnp.swapaxes(q_KBV, 0, 1), cache


def _verify(p_BTV, q_BKV, drafts_BK, key):
    """How many drafts each row accepts [B], and the token drawn after them [B].

    p_BTV holds the target's distributions at the K draft positions and the bonus
    position (T = K + 1); q_BKV the draft's at the K draft positions.
    """
    B, K = drafts_BK.shape
    accept_key, next_key = jax.random.split(key)
    p_at_BK = jnp.take_along_axis(p_BTV[:, :K], drafts_BK[..., None], axis=-1)[..., 0]
    q_at_BK = jnp.take_along_axis(q_BKV, drafts_BK[..., None], axis=-1)[..., 0]
    # u < p/q without dividing; q(d) > 0 because d was drawn from q, and u < 1 so
    # a draft that the target likes at least as much is always accepted.
    accept_BK = jax.random.uniform(accept_key, (B, K)) * q_at_BK < p_at_BK
    n_accepted_B = jnp.sum(jnp.cumprod(accept_BK.astype(jnp.int32), axis=1), axis=1)

    # At the bonus position q is zero, so the residual below is the target itself.
    q_BTV = jnp.concatenate([q_BKV, jnp.zeros_like(q_BKV[:, :1])], axis=1)
    at = n_accepted_B[:, None, None]
    p_BV = jnp.take_along_axis(p_BTV, at, axis=1)[:, 0]
    q_BV = jnp.take_along_axis(q_BTV, at, axis=1)[:, 0]
    residual_BV = jnp.maximum(p_BV - q_BV, 0.0)
    total_B1 = residual_BV.sum(axis=-1, keepdims=True)
    # An empty residual means p == q there, where a rejection has probability zero;
    # fall back to p so rounding can never produce a division by zero.
    next_BV = jnp.where(total_B1 > 0, residual_BV / jnp.where(total_B1 > 0, total_B1, 1.0), p_BV)
    return n_accepted_B, _draw(next_key, next_BV)


def _keep(s: _RoundState, drafts_BK, n_accepted_B, next_B, stops_S, max_new_tokens: int):
    """Append each row's accepted drafts and next token, up to max_new_tokens or a stop token.

    Returns the new output buffer, counts and done flags, and which rows stay live.
    """
    B, K = drafts_BK.shape
    j_T = jnp.arange(K + 1)
    live_B = ~s.done
    new_BT = jnp.where(j_T[None] == n_accepted_B[:, None], next_B[:, None], jnp.pad(drafts_BK, ((0, 0), (0, 1))))
    n_new_B = jnp.where(live_B, jnp.minimum(n_accepted_B + 1, max_new_tokens - s.count), 0)
    is_stop_BT = jnp.any(new_BT[..., None] == stops_S, axis=-1) & (j_T[None] < n_new_B[:, None])
    stopped_B = jnp.any(is_stop_BT, axis=1)
    n_keep_B = jnp.where(stopped_B, jnp.argmax(is_stop_BT, axis=1), n_new_B)  # stop token dropped

    # Positions past what a row keeps point outside the buffer and are dropped.
    at_BT = jnp.where(j_T[None] < n_keep_B[:, None], s.count[:, None] + j_T[None], max_new_tokens)
    tokens = s.tokens.at[jnp.arange(B)[:, None], at_BT].set(new_BT, mode="drop")
    count_B = s.count + n_keep_B
    done_B = s.done | stopped_B | (count_B >= max_new_tokens)
    return tokens, count_B, done_B, live_B & ~done_B


@functools.partial(
    jax.jit, static_argnames=("target_cfg", "draft_cfg", "n_draft", "max_new_tokens", "cache_len")
)
def _speculate(
    target_params, draft_params, tokens_BP, lengths_B, sp, stops_S, key,
    *, target_cfg, draft_cfg, n_draft, max_new_tokens, cache_len,
):
    B = tokens_BP.shape[0]
    prefill = functools.partial(
        _prefill, tokens_BP=tokens_BP, lengths_B=lengths_B, key=key,
        max_new_tokens=max_new_tokens, cache_len=cache_len, stop_window=1,
    )
    # Step each cache back over the last prompt token: the first round feeds it again
    # (rewriting the same keys and values), which keeps the invariant from the start.
    end_B = lengths_B - 1
    state = _RoundState(
        target_cache=prefill(target_params, target_cfg).cache.replace(end=end_B),
        draft_cache=prefill(draft_params, draft_cfg).cache.replace(end=end_B),
        last=jnp.take_along_axis(tokens_BP, end_B[:, None], axis=1)[:, 0],
        tokens=jnp.full((B, max_new_tokens), _NOT_GENERATED, jnp.int32),
        count=jnp.zeros((B,), jnp.int32),
        done=jnp.zeros((B,), bool),
        accepted=jnp.zeros((), jnp.int32),
        proposed=jnp.zeros((), jnp.int32),
        rounds=jnp.zeros((), jnp.int32),
        key=key,
    )
    target = Transformer(target_cfg)

    def one_round(s: _RoundState) -> _RoundState:
        key, draft_key, verify_key = jax.random.split(s.key, 3)
        start_B = s.target_cache.end  # == s.draft_cache.end
        drafts_BK, q_BKV, draft_cache = _propose(draft_params, draft_cfg, s.draft_cache, s.last, sp, draft_key, n_draft)
        fed_BT = jnp.concatenate([s.last[:, None], drafts_BK], axis=1)
        weights = dequantize_params(target_params, compute_dtype(target_cfg))
        logits_BTV, target_cache = target.apply({"params": weights}, fed_BT, cache=s.target_cache)
        p_BTV = jax.vmap(_probs, in_axes=(1, None), out_axes=1)(logits_BTV, sp)
        n_accepted_B, next_B = _verify(p_BTV, q_BKV, drafts_BK, verify_key)
        tokens, count_B, done_B, still_live_B = _keep(s, drafts_BK, n_accepted_B, next_B, stops_S, max_new_tokens)

        # Roll back: keep the last token and the accepted drafts; next_B becomes the
        # pending token. Finished rows keep their old `end`, so their (ignored) writes in
        # later rounds stay inside the cache.
        end_B = jnp.where(still_live_B, start_B + 1 + n_accepted_B, start_B)
        live_B = ~s.done
        return s.replace(
            target_cache=target_cache.replace(end=end_B),
            draft_cache=draft_cache.replace(end=end_B),
            last=jnp.where(still_live_B, next_B, s.last),
            tokens=tokens,
            count=count_B,
            done=done_B,
            accepted=s.accepted + jnp.sum(jnp.where(live_B, n_accepted_B, 0)),
            proposed=s.proposed + n_draft * jnp.sum(live_B),
            rounds=s.rounds + 1,
            key=key,
        )

    return jax.lax.while_loop(lambda s: ~jnp.all(s.done), one_round, state)


def _check_models(target_cfg: ModelConfig, draft_cfg: ModelConfig, n_draft: int, sampling: SamplingParams):
    if not isinstance(n_draft, (int, np.integer)) or n_draft < 1:
        raise ValueError(f"n_draft must be an integer >= 1, got {n_draft!r}")
    if draft_cfg.vocab_size != target_cfg.vocab_size:
        raise ValueError(
            f"draft_cfg.vocab_size={draft_cfg.vocab_size} differs from target_cfg.vocab_size="
            f"{target_cfg.vocab_size}; the draft must share the target's vocabulary"
        )
    if np.any(np.asarray(sampling.repetition_penalty) != 1.0) or np.any(np.asarray(sampling.presence_penalty) != 0.0):
        raise ValueError("sampling: repetition_penalty and presence_penalty are not supported by speculative decoding")


def _check_context(cfgs: dict[str, ModelConfig], longest: int, max_new_tokens: int, n_draft: int):
    """Verification writes up to n_draft slots past the last kept token, so they must fit too."""
    for name, cfg in cfgs.items():
        if longest + max_new_tokens + n_draft > cfg.max_seq_len:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} plus n_draft={n_draft} overflows {name}.max_seq_len="
                f"{cfg.max_seq_len}: the longest prompt ({longest} tokens) + max_new_tokens + n_draft must fit"
            )


def speculative_generate(
    target_params,
    target_cfg: ModelConfig,
    draft_params,
    draft_cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    n_draft: int = 4,
    sampling: SamplingParams | dict | None = None,
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
) -> SpeculativeResult:
    """Sample continuations of token-id prompts from the target, sped up by a draft model.

    The output follows the target's filtered sampling distribution exactly (temperature 0
    gives the target's greedy output); the draft only changes how many target calls it
    takes. `sampling` is a `SamplingParams` or a dict of its settings, as in `generate`,
    without the repetition/presence penalties. Generation of a row ends at a stop token
    (not included) or after exactly `max_new_tokens` tokens.
    """
    B = len(prompts)
    if not isinstance(sampling, SamplingParams):
        sampling = SamplingParams.make(max(B, 1), **(sampling or {}))
    _check_models(target_cfg, draft_cfg, n_draft, sampling)
    tokens_BP, lengths_B = _check_and_pad(target_cfg, prompts, max_new_tokens)
    longest = max(len(p) for p in prompts)
    _check_context({"target_cfg": target_cfg, "draft_cfg": draft_cfg}, longest, max_new_tokens, n_draft)

    # Trim the bucket's padding if it would not leave room for the generation and the
    # drafts in the smaller context; the cache length then depends only on the bucket.
    context = min(target_cfg.max_seq_len, draft_cfg.max_seq_len)
    tokens_BP = tokens_BP[:, : min(tokens_BP.shape[1], context - max_new_tokens - n_draft)]
    cache_len = tokens_BP.shape[1] + max_new_tokens + n_draft

    bad = [t for t in stop_tokens if not 0 <= int(t) < target_cfg.vocab_size]
    if bad:
        raise ValueError(f"stop_tokens: token ids outside [0, {target_cfg.vocab_size}): {bad[:5]}")
    # Padded with -1, which matches no token, so that no or one stop token share a compilation.
    stops_S = np.full(max(len(stop_tokens), 1), -1, np.int32)
    stops_S[: len(stop_tokens)] = list(stop_tokens)

    state = _speculate(
        target_params, draft_params, tokens_BP, lengths_B, sampling, jnp.asarray(stops_S), jax.random.key(seed),
        target_cfg=target_cfg, draft_cfg=draft_cfg, n_draft=int(n_draft),
        max_new_tokens=max_new_tokens, cache_len=cache_len,
    )
    tokens, count, accepted, proposed, rounds = jax.device_get(
        (state.tokens, state.count, state.accepted, state.proposed, state.rounds)
    )
    return SpeculativeResult(
        tokens=[row[:n].tolist() for row, n in zip(tokens, count)],
        acceptance_rate=float(accepted) / max(int(proposed), 1),
        target_calls=1 + int(rounds),
    )
