"""Speculative decoding: exact greedy output, the target's sampling distribution, bad input."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import ModelConfig
from llm_jax.inference import SamplingParams, filter_logits, generate, speculative_generate
from llm_jax.models import Transformer, init_params

# Random models with a large init, so that their next-token choices vary with the context
# and a draft with other weights disagrees with the target often (a low acceptance rate).
# The draft shares the target's shape so that every greedy test reuses one compilation;
# the distribution test below uses a draft of another shape.
TARGET = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                     max_seq_len=64, init_std=0.5)
DRAFT = TARGET
GREEDY = dict(temperature=0.0)
N_NEW = 12  # not a multiple of n_draft + 1: the last round must be cut short
PROMPTS = [[3, 17, 5, 9, 22], [1, 2, 3], list(range(7, 21)), [40]]  # rows accept different counts


@functools.cache
def _models(target_cfg=TARGET, draft_cfg=DRAFT):
    # Jitted: initialising op by op is much slower than compiling on a busy CPU.
    init = jax.jit(init_params, static_argnums=0)
    return init(target_cfg, jax.random.key(0)), init(draft_cfg, jax.random.key(1))


def _target_greedy(prompt):
    target_params, _ = _models()
    return generate(target_params, TARGET, [prompt], max_new_tokens=N_NEW, sampling=GREEDY).tokens[0]


def _speculate_greedy(draft_params, **kwargs):
    target_params, _ = _models()
    return speculative_generate(target_params, TARGET, draft_params, DRAFT, PROMPTS,
                                max_new_tokens=N_NEW, n_draft=4, sampling=GREEDY, **kwargs)


# ------------------------------------------------------------------------------ greedy


def test_greedy_matches_the_target_alone_for_each_prompt_of_a_batch_with_a_poor_draft():
    _, draft_params = _models()
    out = _speculate_greedy(draft_params)
    for prompt, tokens in zip(PROMPTS, out.tokens):
        expected = _target_greedy(prompt)
        assert len(set(expected)) > 1  # the target does not just repeat one token
        assert tokens == expected
    assert out.acceptance_rate < 0.5  # the draft really is a different model ...
    assert out.target_calls > 1 + 3  # ... so rounds keep fewer than n_draft + 1 tokens


def test_greedy_with_the_target_as_draft_accepts_everything():
    target_params, _ = _models()
    out = _speculate_greedy(target_params)
    assert out.tokens == [_target_greedy(p) for p in PROMPTS]
    assert out.acceptance_rate == 1.0
    # The prefill plus rounds of 5 tokens (4 drafts + the bonus): 5 + 5 + 2 = 12.
    assert out.target_calls == 1 + 3 < N_NEW


def test_quantized_target_and_draft_give_the_quantized_targets_greedy_output():
    from llm_jax.inference.quantize import quantize_params

    target_params, draft_params = (quantize_params(p, TARGET, bits=8) for p in _models())
    out = speculative_generate(target_params, TARGET, draft_params, DRAFT, PROMPTS[:2], max_new_tokens=N_NEW,
                               n_draft=4, sampling=GREEDY)
    expected = generate(target_params, TARGET, PROMPTS[:2], max_new_tokens=N_NEW, sampling=GREEDY).tokens
    assert out.tokens == expected


def test_a_stop_token_ends_its_row_and_is_removed():
    _, draft_params = _models()
    free = [_target_greedy(p) for p in PROMPTS]
    stop = free[0][4]
    out = _speculate_greedy(draft_params, stop_tokens=[stop])
    assert out.tokens[0] == free[0][: free[0].index(stop)]
    for row, tokens in zip(free, out.tokens):
        assert tokens == (row[: row.index(stop)] if stop in row else row)


# ------------------------------------------------------------------------ distribution

V_SMALL = 8
SMALL_TARGET = ModelConfig(vocab_size=V_SMALL, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                           max_seq_len=16, init_std=0.5)
SMALL_DRAFT = dataclasses.replace(SMALL_TARGET, d_model=8, n_heads=1)


def _exact_joint(params, cfg, first_token, settings):
    """P(t1, t2 | first_token) [V, V] under the filtered sampling distribution, from full forward passes."""
    seqs = jnp.asarray([[first_token, t] for t in range(V_SMALL)])
    logits_BTV, _ = jax.jit(Transformer(cfg).apply)({"params": params}, seqs)
    sp = SamplingParams.make(V_SMALL, **settings)
    p1_V = jax.nn.softmax(filter_logits(logits_BTV[:, 0], sp), axis=-1)[0]  # same for every row
    p2_VV = jax.nn.softmax(filter_logits(logits_BTV[:, 1], sp), axis=-1)  # row t1: P(t2 | t1)
    return np.asarray(p1_V[:, None] * p2_VV, np.float64)


def _total_variation(a, b):
    return 0.5 * np.abs(a - b).sum()


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.8, top_k=4)],
                         ids=["temperature=1", "temperature=0.8,top_k=4"])
def test_samples_follow_the_targets_distribution_not_the_drafts(settings):
    target_params, draft_params = _models(SMALL_TARGET, SMALL_DRAFT)
    rows, first = 4000, 5
    out = speculative_generate(target_params, SMALL_TARGET, draft_params, SMALL_DRAFT, [[first]] * rows,
                               max_new_tokens=2, n_draft=2, sampling=settings, seed=0)
    assert all(len(t) == 2 for t in out.tokens)
    assert 0.0 < out.acceptance_rate < 1.0  # both accepting and rejecting happened
    pairs = np.asarray(out.tokens)
    empirical = np.bincount(pairs[:, 0] * V_SMALL + pairs[:, 1], minlength=V_SMALL**2).reshape(V_SMALL, V_SMALL)
    empirical = empirical / rows

    # For m cells and n samples an exact sampler's expected total variation is at most
    # 0.5 * sum_i sqrt(p_i / n) <= 0.5 * sqrt(m / n) (Cauchy-Schwarz): 0.063 here.
    tolerance = 0.5 * np.sqrt(V_SMALL**2 / rows)
    target = _exact_joint(target_params, SMALL_TARGET, first, settings)
    draft = _exact_joint(draft_params, SMALL_DRAFT, first, settings)
    assert _total_variation(target, draft) > 3 * tolerance  # the test can tell them apart
    assert _total_variation(empirical, target) < tolerance
    assert _total_variation(empirical, draft) > tolerance


# -------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(n_draft=0), ["n_draft", ">= 1"]),
        (dict(n_draft=-2), ["n_draft"]),
        (dict(draft_cfg=dataclasses.replace(DRAFT, vocab_size=32)),
         ["draft_cfg.vocab_size=32", "target_cfg.vocab_size=64"]),
        (dict(max_new_tokens=0), ["max_new_tokens"]),
        (dict(prompts=[[1], []]), ["prompts", "empty"]),
        (dict(max_new_tokens=58, n_draft=4), ["n_draft=4", "max_new_tokens=58", "max_seq_len"]),
        (dict(draft_cfg=dataclasses.replace(DRAFT, max_seq_len=16), max_new_tokens=10), ["draft_cfg.max_seq_len"]),
        (dict(sampling=dict(repetition_penalty=1.2)), ["repetition_penalty"]),
        (dict(stop_tokens=[64]), ["stop_tokens", "outside [0, 64)"]),
    ],
)
def test_bad_arguments_are_refused_naming_them(kwargs, words):
    target_params, draft_params = _models()
    args = dict(prompts=[[1, 2, 3]], draft_cfg=DRAFT, max_new_tokens=4) | kwargs
    with pytest.raises(ValueError) as e:
        speculative_generate(target_params, TARGET, draft_params, args.pop("draft_cfg"), args.pop("prompts"), **args)
    for word in words:
        assert word in str(e.value)
