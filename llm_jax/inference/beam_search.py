"""Beam search: a jitted prefill, then one jitted `lax.while_loop` over W beams per prompt.

    prompts -> right-pad -> prefill (B rows) -> repeat each row's cache W times (B*W rows)
            -> loop: extend every alive beam by every token, keep the best W that did not
                     stop alive (reordering the cache rows to follow their parents), move
                     the best W that ended in a stop token to a pool of finished ones

Scores are summed log-probabilities. A finished hypothesis is ranked by its normalised
score `sum_logprob / length ** length_penalty` (GNMT / Hugging Face style), where
`length` counts the generated tokens including the stop token, whose probability is part
of the sum. Beams still alive after `max_new_tokens` join the pool at that length.

A prompt stops early once no alive beam can beat the worst of W finished hypotheses.
The bound is exact (log-probs are <= 0, so a beam's sum can only fall), so stopping early
never changes the answer compared with running all `max_new_tokens` steps.

Shape letters as in `llm_jax.models`, plus: W beams per prompt, N new tokens (not heads).
Cache row `b * W + w` holds beam w of prompt b.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.inference.generate import _check_and_pad, _prompt_pass
from llm_jax.inference.quantize import dequantize_params
from llm_jax.models import KVCache, Transformer
from llm_jax.models.layers import compute_dtype

_NO_TOKEN = -1  # in token buffers: past the end of a hypothesis
_NEG_INF = -jnp.inf  # the score of an empty slot or impossible beam

# Which axis of each cache field is the batch axis, for `jax.tree.map` over a KVCache.
_BATCH_AXIS = KVCache(k=1, v=1, end=0, prefix=0)


@dataclasses.dataclass(frozen=True)
class BeamSearchResult:
    """What `beam_search` returns, one entry per prompt."""

    tokens: list[list[int]]  # the best hypothesis, stop token removed
    scores: list[float]  # its normalised log-prob: sum / length ** length_penalty
    beams: list[list[list[int]]]  # every final hypothesis, best first (beams[i][0] == tokens[i])
    beam_scores: list[list[float]]  # their normalised scores, descending


@flax.struct.dataclass
class BeamState:
    cache: KVCache  # B*W rows, one per alive beam
    logits_BWV: jax.Array  # next-token logits of each alive beam
    alive_BWN: jax.Array  # tokens of the alive beams, _NO_TOKEN past `step`
    alive_score_BW: jax.Array  # their summed log-probs (not normalised)
    fin_BWN: jax.Array  # finished hypotheses, stop token not written
    fin_score_BW: jax.Array  # their normalised scores, -inf for an empty slot
    step: jax.Array  # [] tokens generated so far by every alive beam
    done_B: jax.Array  # the prompt's search is over: no alive beam can enter the pool


def _gather_rows(cache: KVCache, rows) -> KVCache:
    return jax.tree.map(lambda x, axis: jnp.take(x, rows, axis=axis), cache, _BATCH_AXIS)


def _keep_best(score_BX, tokens_BXN, k):
    """The k best entries by score, best first."""
    score_BK, idx_BK = jax.lax.top_k(score_BX, k)
    return score_BK, jnp.take_along_axis(tokens_BXN, idx_BK[..., None], axis=1)


def _prefill(params, cfg: ModelConfig, tokens_BP, lengths_B, beam_size: int, cache_len: int):
    """Run the prompts once, then give each of a prompt's W beams its own copy of the cache."""
    empty = KVCache.init(cfg, tokens_BP.shape[0], cache_len)
    last_BV, cache, _ = _prompt_pass(params, cfg, tokens_BP, lengths_B, empty)
    cache = jax.tree.map(lambda x, axis: jnp.repeat(x, beam_size, axis=axis), cache, _BATCH_AXIS)
    return cache, jnp.repeat(last_BV[:, None], beam_size, axis=1)


def _init_state(cache, logits_BWV, max_new_tokens: int) -> BeamState:
    B, W, _ = logits_BWV.shape
    # All W beams start identical: only the first may expand, or step 0 would offer each
    # continuation W times.
    alive_score_BW = jnp.where(jnp.arange(W) == 0, 0.0, _NEG_INF) * jnp.ones((B, 1))
    empty_BWN = jnp.full((B, W, max_new_tokens), _NO_TOKEN, jnp.int32)
    return BeamState(
        cache=cache,
        logits_BWV=logits_BWV,
        alive_BWN=empty_BWN,
        alive_score_BW=alive_score_BW,
        fin_BWN=empty_BWN,
        fin_score_BW=jnp.full((B, W), _NEG_INF),
        step=jnp.zeros((), jnp.int32),
        done_B=jnp.zeros((B,), bool),
    )


def _cannot_improve(alive_score_BW, fin_score_BW, length, max_new_tokens: int, length_penalty):
    """True where no alive beam (of `length` tokens) can beat the worst finished hypothesis.

    A beam's summed log-prob only falls as it grows, so its best final normalised score is
    its current sum over the length divisor at its most favourable final length: the longest
    possible when length_penalty > 0 (dividing a negative sum by more raises it), else the
    shortest. The pool's worst is -inf while it has free slots, so it never stops early then.
    """
    shortest = jnp.minimum(length + 1, max_new_tokens)
    best_length = jnp.where(length_penalty > 0, max_new_tokens, shortest).astype(jnp.float32)
    bound_B = jnp.max(alive_score_BW, axis=-1) / best_length**length_penalty
    return bound_B <= jnp.min(fin_score_BW, axis=-1)


def _step(params, cfg: ModelConfig, s: BeamState, is_stop_V, length_penalty, max_new_tokens: int) -> BeamState:
    B, W, V = s.logits_BWV.shape
    logp_BWV = jax.nn.log_softmax(s.logits_BWV.astype(jnp.float32), axis=-1)
    cand_BX = (s.alive_score_BW[..., None] + logp_BWV).reshape(B, W * V)  # X = W*V candidates
    stops_X = jnp.tile(is_stop_V, W)
    # Two top-W selections, over stopping and over non-stopping candidates, rather than the
    # usual single top-2W: with several stop tokens, the best 2W candidates may hold fewer
    # than W that did not stop, and the alive beams would then thin out.
    length = s.step + 1  # of every candidate, stop token included

    # Candidates ending in a stop token finish: the best W are offered to the pool. A
    # prompt that is done takes no more (its alive beams keep running, unused).
    stop_score_BW, stop_idx_BW = jax.lax.top_k(jnp.where(stops_X, cand_BX, _NEG_INF), W)
    stop_score_BW = jnp.where(s.done_B[:, None], _NEG_INF, stop_score_BW / length.astype(jnp.float32) ** length_penalty)
    stop_BWN = jnp.take_along_axis(s.alive_BWN, (stop_idx_BW // V)[..., None], axis=1)
    fin_score_BW, fin_BWN = _keep_best(
        jnp.concatenate([s.fin_score_BW, stop_score_BW], axis=1),
        jnp.concatenate([s.fin_BWN, stop_BWN], axis=1),
        W,
    )

    # The best W others stay alive; each takes over its parent's cache row.
    alive_score_BW, idx_BW = jax.lax.top_k(jnp.where(stops_X, _NEG_INF, cand_BX), W)
    parent_BW, token_BW = idx_BW // V, idx_BW % V
    alive_BWN = jnp.take_along_axis(s.alive_BWN, parent_BW[..., None], axis=1).at[:, :, s.step].set(token_BW)
    cache = _gather_rows(s.cache, (jnp.arange(B)[:, None] * W + parent_BW).reshape(B * W))
    # Inside the loop, as in `generate`: quantized weights stay quantized in memory between steps.
    weights = dequantize_params(params, compute_dtype(cfg))
    logits, cache = Transformer(cfg).apply({"params": weights}, token_BW.reshape(B * W, 1), cache=cache)

    done_B = s.done_B | _cannot_improve(alive_score_BW, fin_score_BW, length, max_new_tokens, length_penalty)
    return BeamState(
        cache=cache,
        logits_BWV=logits[:, 0].reshape(B, W, V),
        alive_BWN=alive_BWN,
        alive_score_BW=alive_score_BW,
        fin_BWN=fin_BWN,
        fin_score_BW=fin_score_BW,
        step=length,
        done_B=done_B,
    )


def _finish(s: BeamState, length_penalty):
    """The final pool: beams still alive after the last step compete at their full length."""
    W = s.fin_score_BW.shape[1]
    alive_score_BW = s.alive_score_BW / s.step.astype(jnp.float32) ** length_penalty
    alive_score_BW = jnp.where(s.done_B[:, None], _NEG_INF, alive_score_BW)
    return _keep_best(
        jnp.concatenate([s.fin_score_BW, alive_score_BW], axis=1),
        jnp.concatenate([s.fin_BWN, s.alive_BWN], axis=1),
        W,
    )


@functools.partial(jax.jit, static_argnames=("cfg", "beam_size", "max_new_tokens"))
def _search(params, cfg: ModelConfig, tokens_BP, lengths_B, stops_S, length_penalty, *, beam_size, max_new_tokens):
    cache, logits_BWV = _prefill(params, cfg, tokens_BP, lengths_B, beam_size, tokens_BP.shape[1] + max_new_tokens)
    is_stop_V = jnp.zeros((cfg.vocab_size,), bool).at[stops_S].set(True)

    def cond(s: BeamState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done_B)

    def body(s: BeamState):
        return _step(params, cfg, s, is_stop_V, length_penalty, max_new_tokens)

    state = jax.lax.while_loop(cond, body, _init_state(cache, logits_BWV, max_new_tokens))
    return _finish(state, length_penalty)


def beam_search(
    params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    beam_size: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    stop_tokens: Sequence[int] = (),
) -> BeamSearchResult:
    """The most probable continuation of each token-id prompt found with `beam_size` beams.

    `length_penalty` > 0 favours longer hypotheses, < 0 shorter ones; it matters only when
    hypotheses end at different lengths, i.e. with `stop_tokens`.
    """
    if not isinstance(beam_size, (int, np.integer)) or beam_size < 1:
        raise ValueError(f"beam_size must be an integer >= 1, got {beam_size!r}")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be finite, got {length_penalty}")
    bad = [t for t in stop_tokens if not 0 <= int(t) < cfg.vocab_size]
    if bad:
        raise ValueError(f"stop_tokens: ids outside [0, {cfg.vocab_size}): {bad[:5]}")
    tokens_BP, lengths_B = _check_and_pad(cfg, prompts, max_new_tokens)

    score_BW, tokens_BWN = jax.device_get(
        _search(
            params, cfg, tokens_BP, lengths_B,
            jnp.asarray(list(stop_tokens), jnp.int32).reshape(-1), jnp.float32(length_penalty),
            beam_size=int(beam_size), max_new_tokens=max_new_tokens,
        )
    )
    beams, beam_scores = [], []
    for score_W, tokens_WN in zip(score_BW, tokens_BWN):
        real_W = np.isfinite(score_W)  # empty slots and beams that never had a finite score
        beams.append([row[row != _NO_TOKEN].tolist() for row in tokens_WN[real_W]])
        beam_scores.append(score_W[real_W].tolist())
    return BeamSearchResult(
        tokens=[b[0] for b in beams],
        scores=[s[0] for s in beam_scores],
        beams=beams,
        beam_scores=beam_scores,
    )
