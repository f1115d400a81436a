"""Beam search, checked against greedy decoding and against brute-force enumeration."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import ModelConfig
from llm_jax.inference import beam_search, generate
from llm_jax.inference.quantize import dequantize_params, quantize_params
from llm_jax.models import Transformer, init_params

# Tiny vocabulary so that every continuation of a few tokens can be enumerated; a large
# init so that the next-token distribution depends strongly on the context.
BASE = ModelConfig(vocab_size=8, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                   max_seq_len=32, init_std=0.5)
GREEDY = dict(temperature=0.0)
PROMPT = [3, 1, 5, 2]
PROMPTS = [PROMPT, [6], [7, 7, 0, 1, 2, 3]]
STOP = 0  # likely enough after PROMPT that many hypotheses end with it


@functools.lru_cache(maxsize=None)
def _params():
    return init_params(BASE, jax.random.key(0))


def _model(mask="causal"):
    """The test model; the mask kind changes no parameter, so both kinds share them."""
    return dataclasses.replace(BASE, mask=mask), _params()


@functools.partial(jax.jit, static_argnames=("cfg",))
def _log_probs_jit(params, cfg, seqs_CT, prompt_len):
    """[C, T, V] next-token log-probs after each position, from a full forward pass (no cache)."""
    prefix = None
    if cfg.mask == "prefix":
        prefix = jnp.broadcast_to(jnp.arange(seqs_CT.shape[1]) < prompt_len, seqs_CT.shape)
    logits, _ = Transformer(cfg).apply({"params": params}, seqs_CT, prefix_mask_BT=prefix)
    return jax.nn.log_softmax(logits, axis=-1)


def _log_probs(params, cfg, prompt, continuations, n):
    """[C, n, V] log-probs of the 1st..n-th token after the prompt, given each continuation.

    Continuations shorter than n are padded, which cannot change what comes before.
    """
    seqs = np.zeros((len(continuations), len(prompt) + n), np.int32)
    seqs[:, : len(prompt)] = prompt
    for row, c in zip(seqs, continuations):
        row[len(prompt) : len(prompt) + len(c)] = c
    logp = _log_probs_jit(params, cfg, jnp.asarray(seqs), len(prompt))
    return np.asarray(logp[:, len(prompt) - 1 : -1], np.float64)


def _token_logprobs(params, cfg, prompt, continuations):
    """[C, N] log-prob of each continuation token; 0 past the end of a shorter one."""
    n = max(len(c) for c in continuations)
    logp_CNV = _log_probs(params, cfg, prompt, continuations, n)
    out = np.zeros(logp_CNV.shape[:2])
    for i, c in enumerate(continuations):
        out[i, : len(c)] = logp_CNV[i, np.arange(len(c)), c]
    return out


def _scores(params, cfg, prompt, hypotheses, length_penalty):
    """Normalised score of each hypothesis: sum of log-probs / length ** length_penalty."""
    logp = _token_logprobs(params, cfg, prompt, hypotheses).sum(axis=1)
    return logp / np.asarray([len(h) for h in hypotheses], np.float64) ** length_penalty


def _rank_all_hypotheses(params, cfg, prompt, n, stop):
    """A function of the length penalty giving every hypothesis beam search could return
    with its normalised score, best first.

    Without a stop token: all V**n continuations. With one: also every shorter sequence
    ending at its first stop token (returned without it, as beam search does, but its
    log-prob and length counted).
    """
    conts = list(itertools.product(range(cfg.vocab_size), repeat=n))
    cum = np.cumsum(_token_logprobs(params, cfg, prompt, conts), axis=1)
    hyps = {}  # hypothesis -> (summed log-prob, length)
    for c, cum_c in zip(conts, cum):
        end = c.index(stop) if stop in c else n - 1
        hyps[c[:end] if stop in c else c] = (cum_c[end], end + 1)

    def rank(length_penalty):
        scored = {h: logp / length**length_penalty for h, (logp, length) in hyps.items()}
        return sorted(scored.items(), key=lambda kv: -kv[1])

    return rank


def _reference_beam_search(params, cfg, prompt, width, n, length_penalty, stop):
    """Textbook beam search over full forward passes, running all n steps (no early stop).

    Returns the `width` best (hypothesis, normalised score), best first.
    """
    alive = [((), 0.0)]  # (tokens, summed log-prob)
    finished = []
    for t in range(n):
        logp_AV = _log_probs(params, cfg, prompt, [a for a, _ in alive] + [()] * (width - len(alive)), n)[:, t]
        cands = sorted(
            ((a + (v,), s + logp_AV[i, v]) for i, (a, s) in enumerate(alive) for v in range(cfg.vocab_size)),
            key=lambda c: -c[1],
        )
        finished += [(c[:-1], s / (t + 1) ** length_penalty) for c, s in cands if c[-1] == stop][:width]
        alive = [(c, s) for c, s in cands if c[-1] != stop][:width]
    finished += [(a, s / n**length_penalty) for a, s in alive]
    return sorted(finished, key=lambda h: -h[1])[:width]


# ------------------------------------------------------------------------ correctness


def test_one_beam_is_greedy_decoding():
    cfg, params = _model()
    beam = beam_search(params, cfg, PROMPTS, beam_size=1, max_new_tokens=10)
    greedy = generate(params, cfg, PROMPTS, max_new_tokens=10, sampling=GREEDY)
    assert beam.tokens == greedy.tokens
    assert len({tuple(t) for t in beam.tokens}) > 1 and len(set(beam.tokens[0])) > 1


@pytest.mark.parametrize(
    "mask, stop, length_penalties",
    [("causal", None, [1.0, 0.0]), ("prefix", STOP, [0.0, 1.0, 3.0])],
)
def test_enough_beams_find_the_best_hypotheses_by_enumeration(mask, stop, length_penalties):
    """With W >= the number of distinct live prefixes nothing is ever pruned, so the W
    returned hypotheses must be exactly the W best of all of them."""
    cfg, params = _model(mask=mask)
    n, width = 3, cfg.vocab_size ** 2  # all V**(n-1) prefixes stay alive
    stops = () if stop is None else (stop,)
    rank = _rank_all_hypotheses(params, cfg, PROMPT, n, stop)
    bests = set()
    for lp in length_penalties:
        out = beam_search(params, cfg, [PROMPT], beam_size=width, max_new_tokens=n, length_penalty=lp,
                          stop_tokens=stops)
        ranked = rank(lp)
        assert ranked[0][1] - ranked[1][1] > 1e-3  # no near-tie that rounding could flip
        assert out.tokens[0] == list(ranked[0][0])
        np.testing.assert_allclose(out.beam_scores[0], [s for _, s in ranked[:width]], atol=1e-4)
        assert len(out.beams[0]) == width and len({tuple(b) for b in out.beams[0]}) == width
        bests.add(tuple(out.tokens[0]))
    if stop is not None:  # the length penalty really changes which hypothesis wins
        assert len(bests) > 1


@pytest.mark.parametrize("length_penalty", [1.0, 0.5, 2.0])
def test_scores_are_normalised_log_probs_and_stop_tokens_are_removed(length_penalty):
    cfg, params = _model()
    n = 6
    out = beam_search(params, cfg, [PROMPT], beam_size=4, max_new_tokens=n, length_penalty=length_penalty,
                      stop_tokens=[STOP])
    beams = out.beams[0]
    assert all(STOP not in b for b in beams)
    # A short hypothesis ended in the stop token, whose log-prob and length count; one of
    # full length never produced it.
    full = [b + [STOP] if len(b) < n else b for b in beams]
    assert any(len(b) < n for b in beams)
    assert any(len(b) == n for b in beams) or length_penalty < 1  # a small penalty favours short ones
    np.testing.assert_allclose(out.beam_scores[0], _scores(params, cfg, PROMPT, full, length_penalty), atol=1e-4)
    assert out.beam_scores[0] == sorted(out.beam_scores[0], reverse=True)
    assert out.tokens[0] == beams[0] and out.scores[0] == out.beam_scores[0][0]


@pytest.mark.parametrize("length_penalty", [3.0, 1.0, -1.0])
def test_matches_a_reference_beam_search_that_never_stops_early(length_penalty):
    # A large penalty favours long hypotheses, so stopping when no alive beam beats the
    # finished ones *at its current length* (a common heuristic) would be wrong here.
    cfg, params = _model()
    prompts, width, n = [PROMPT, [6, 1]], 2, 8
    out = beam_search(params, cfg, prompts, beam_size=width, max_new_tokens=n, length_penalty=length_penalty,
                      stop_tokens=[STOP])
    for i, prompt in enumerate(prompts):
        expected = _reference_beam_search(params, cfg, prompt, width, n, length_penalty, STOP)
        assert out.beams[i] == [list(h) for h, _ in expected]
        np.testing.assert_allclose(out.beam_scores[i], [s for _, s in expected], atol=1e-4)


def test_batched_prompts_of_different_lengths_match_running_each_alone():
    cfg, params = _model()
    # 17 tokens crosses a 16-token padding bucket; the stop token makes prompts finish at
    # different steps, so a finished prompt must not change while the others go on.
    prompts = [PROMPT, [6, 1], list(range(8)) * 2 + [5]]
    kwargs = dict(beam_size=4, max_new_tokens=6, length_penalty=0.8, stop_tokens=[STOP])
    batched = beam_search(params, cfg, prompts, **kwargs)
    for i, prompt in enumerate(prompts):
        alone = beam_search(params, cfg, [prompt], **kwargs)
        assert alone.tokens[0] == batched.tokens[i] and alone.beams[0] == batched.beams[i]
        np.testing.assert_allclose(alone.beam_scores[0], batched.beam_scores[i], atol=1e-5)
    assert len({len(b) for beams in batched.beams for b in beams}) > 1  # some stopped early


def test_beam_search_scores_at_least_as_well_as_greedy():
    # Not a theorem for small beams in general, but it must hold on a random model, and
    # a wider search must find something strictly better for some prompt.
    cfg, params = _model()
    greedy = generate(params, cfg, PROMPTS, max_new_tokens=10, sampling=GREEDY).tokens
    beam = beam_search(params, cfg, PROMPTS, beam_size=4, max_new_tokens=10, length_penalty=1.0)
    greedy_scores = [_scores(params, cfg, p, [g], 1.0)[0] for p, g in zip(PROMPTS, greedy)]
    assert all(b >= g - 1e-5 for b, g in zip(beam.scores, greedy_scores))
    assert any(b > g + 1e-3 for b, g in zip(beam.scores, greedy_scores))


def test_quantized_weights_search_as_their_dequantized_values():
    """int8 weights stay quantized in memory; the prompt pass and every step dequantize them."""
    cfg, params = _model()
    quantized = quantize_params(params, cfg, bits=8)
    kwargs = dict(beam_size=3, max_new_tokens=5, stop_tokens=[STOP])
    direct = beam_search(quantized, cfg, PROMPTS, **kwargs)
    reference = beam_search(dequantize_params(quantized), cfg, PROMPTS, **kwargs)
    assert direct.beams == reference.beams
    np.testing.assert_allclose(direct.beam_scores, reference.beam_scores, atol=1e-6)


# -------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(beam_size=0), ["beam_size", ">= 1"]),
        (dict(beam_size=2.0), ["beam_size"]),
        (dict(prompts=[[1, 2], []]), ["prompts", "empty"]),
        (dict(max_new_tokens=40), ["max_new_tokens", "overflows"]),
        (dict(max_new_tokens=0), ["max_new_tokens"]),
        (dict(stop_tokens=[99]), ["stop_tokens"]),
        (dict(length_penalty=float("nan")), ["length_penalty"]),
    ],
)
def test_bad_requests_are_refused(kwargs, words):
    cfg, params = _model()
    args = dict(prompts=[[1, 2]], beam_size=2, max_new_tokens=4) | kwargs
    with pytest.raises(ValueError) as e:
        beam_search(params, cfg, args.pop("prompts"), **args)
    for word in words:
        assert word in str(e.value)
