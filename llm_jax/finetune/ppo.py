"""RLHF with PPO (Schulman et al., 2017; Ouyang et al., 2022) on an llm_jax policy.

One iteration:

    prompts -> generate (llm_jax's jitted decoding loop)         responses, sampled
            -> reward_fn(prompts, responses)                     one score per response
            -> score_rollout (one jitted call)                   log pi, log pi_ref, values,
                                                                 per-token rewards, GAE
            -> ppo_update (one jitted scan)                      ppo_epochs x minibatches of
                                                                 clipped policy + value steps

Per-token reward: -kl_coef * (log pi - log pi_ref) on every response token, plus the
score on the last one, so the policy pays for every nat it drifts from the frozen
reference. The value head is a linear head on the policy's final hidden states (the
trunk is shared: params are `{"lm": ..., "value_head": ...}`), zero at the start. A PEFT
policy (`model.peft`) trains its method's parameters and the value head only; the rest
of the LM is the steps' `frozen` argument.

The reward is a Python function of token ids, `reward_fn(prompts, responses) -> [B]`
(a programmatic reward, or `reward_model_fn` around a trained reward model). Responses
reach it as sampled: ending with the eos id when the policy stopped.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.finetune.align_config import PPOConfig
from llm_jax.finetune.preference import index_batches
from llm_jax.finetune.reward import reward_scores
from llm_jax.finetune.sequences import (
    Sequences,
    action_mask,
    committed_like,
    init_scalar_head,
    lm_forward,
    new_train_state,
    optimizer,
    pack,
    scalar_head,
    split_tuned,
    token_logprobs,
    with_frozen,
)
from llm_jax.inference import generate
from llm_jax.training.step import apply_gradients

RewardFn = Callable[[list[list[int]], list[list[int]]], Sequence[float]]
_WIDTH_BUCKET = 16


@flax.struct.dataclass
class Rollout:
    """A scored batch of responses; [B, A] arrays are indexed by action (see `sequences`)."""

    seqs: Sequences
    logp: jax.Array  # log pi_old of each action
    values: jax.Array  # value head of the policy that sampled
    advantages: jax.Array  # GAE, whitened if asked; 0 off the response
    returns: jax.Array  # value targets: advantages (before whitening) + values
    mask: jax.Array  # response actions


def generalized_advantages(rewards_BA, values_BA, mask_BA, gamma: float, lam: float):
    """GAE(gamma, lambda) per action, scanned backwards; the value after the response is 0."""

    def step(carry, x):
        next_value, next_adv = carry
        reward, value, m = x
        delta = reward + gamma * next_value - value
        adv = (delta + gamma * lam * next_adv) * m
        return (value * m, adv), adv

    zeros = jnp.zeros(rewards_BA.shape[:1], jnp.float32)
    _, adv_AB = jax.lax.scan(step, (zeros, zeros), (rewards_BA.T, values_BA.T, mask_BA.T), reverse=True)
    advantages_BA = adv_AB.T
    return advantages_BA, (advantages_BA + values_BA) * mask_BA


def _masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _whiten(x_BA, mask_BA):
    mean = _masked_mean(x_BA, mask_BA)
    var = _masked_mean(jnp.square(x_BA - mean), mask_BA)
    return (x_BA - mean) * jax.lax.rsqrt(var + 1e-8) * mask_BA


def _policy_outputs(params, frozen, model_cfg: ModelConfig, seqs: Sequences, temperature: float):
    logits_BTV, hidden_BTD = lm_forward(with_frozen(params["lm"], frozen), model_cfg, seqs)
    return token_logprobs(logits_BTV, seqs.tokens, temperature), scalar_head(params["value_head"], hidden_BTD[:, :-1])


@functools.partial(jax.jit, static_argnames=("model_cfg", "cfg"))
def score_rollout(params, frozen, ref_params, seqs: Sequences, scores_B, *, model_cfg: ModelConfig,
                  cfg: PPOConfig):
    """Log-probabilities, values, KL-penalised rewards and advantages of sampled responses."""
    mask_BA = action_mask(seqs).astype(jnp.float32)
    logp_BA, values_BA = _policy_outputs(params, frozen, model_cfg, seqs, cfg.temperature)
    ref_logits_BTV, _ = lm_forward(ref_params, model_cfg, seqs)
    kl_BA = (logp_BA - token_logprobs(ref_logits_BTV, seqs.tokens, cfg.temperature)) * mask_BA
    last_BA = jax.nn.one_hot(seqs.lengths - 2, mask_BA.shape[1])  # the response's final action
    rewards_BA = -cfg.kl_coef * kl_BA + scores_B[:, None] * last_BA
    values_BA = values_BA * mask_BA
    advantages_BA, returns_BA = generalized_advantages(rewards_BA, values_BA, mask_BA, cfg.gamma, cfg.gae_lambda)
    if cfg.whiten_advantages:
        advantages_BA = _whiten(advantages_BA, mask_BA)
    rollout = Rollout(seqs=seqs, logp=logp_BA, values=values_BA, advantages=advantages_BA, returns=returns_BA,
                      mask=mask_BA)
    metrics = {
        "score": jnp.mean(scores_B),
        "kl": jnp.mean(jnp.sum(kl_BA, axis=1)),  # per response: sum of log pi - log pi_ref (k1 estimate)
        "response_length": jnp.mean(jnp.sum(mask_BA, axis=1)),
        "value": _masked_mean(values_BA, mask_BA),
    }
    return rollout, metrics


def ppo_loss(params, frozen, batch: Rollout, model_cfg: ModelConfig, cfg: PPOConfig):
    """Clipped policy loss + vf_coef * clipped value loss, averaged over response tokens."""
    logp_BA, values_BA = _policy_outputs(params, frozen, model_cfg, batch.seqs, cfg.temperature)
    m = batch.mask
    log_ratio_BA = jnp.where(m > 0, logp_BA - batch.logp, 0.0)  # off the response: ratio 1, never inf
    ratio_BA = jnp.exp(log_ratio_BA)
    clipped_BA = jnp.clip(ratio_BA, 1 - cfg.clip_ratio, 1 + cfg.clip_ratio)
    pg_loss = _masked_mean(jnp.maximum(-batch.advantages * ratio_BA, -batch.advantages * clipped_BA), m)
    values_clipped_BA = batch.values + jnp.clip(values_BA - batch.values, -cfg.clip_value, cfg.clip_value)
    vf_loss = 0.5 * _masked_mean(jnp.maximum(jnp.square(values_BA - batch.returns),
                                             jnp.square(values_clipped_BA - batch.returns)), m)
    loss = pg_loss + cfg.vf_coef * vf_loss
    return loss, {
        "loss": loss,
        "pg_loss": pg_loss,
        "vf_loss": vf_loss,
        "clip_fraction": _masked_mean((jnp.abs(ratio_BA - 1) > cfg.clip_ratio).astype(jnp.float32), m),
        "approx_kl_old": _masked_mean(ratio_BA - 1 - log_ratio_BA, m),  # KL(old || new), always >= 0
    }


@functools.partial(jax.jit, static_argnames=("model_cfg", "cfg"), donate_argnums=0)
def ppo_update(state, frozen, rollout: Rollout, *, model_cfg: ModelConfig, cfg: PPOConfig):
    """`cfg.ppo_epochs` shuffled passes of minibatch steps over one rollout batch, as one scan."""
    B = rollout.mask.shape[0]
    rng, perm_rng = jax.random.split(state.rng)
    keys = jax.random.split(perm_rng, cfg.ppo_epochs)
    order = jax.vmap(lambda k: jax.random.permutation(k, B))(keys).reshape(-1, cfg.minibatch_size)

    def one(state, index):
        batch = jax.tree.map(lambda x: x[index], rollout)
        grads, metrics = jax.grad(ppo_loss, has_aux=True)(state.params, frozen, batch, model_cfg, cfg)
        state, step_metrics = apply_gradients(state, grads, metrics["loss"])
        return state, {**metrics, **step_metrics}

    state, metrics = jax.lax.scan(one, state.replace(rng=rng), order)
    return state, jax.tree.map(jnp.mean, metrics)


# ----------------------------------------------------------------------------- rollouts


def fit_prompts(prompts: Sequence[Sequence[int]], model_cfg: ModelConfig, max_new_tokens: int):
    """Prompts cut from the left to leave room for `max_new_tokens`, and how many were cut."""
    room = model_cfg.max_seq_len - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                         f"model.max_seq_len={model_cfg.max_seq_len}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: need at least one prompt, and every prompt at least one token")
    return [list(p)[-room:] for p in prompts], sum(len(p) > room for p in prompts)


def sample_responses(lm_params, model_cfg: ModelConfig, prompts: list[list[int]], cfg: PPOConfig, seed: int,
                     eos_id: int | None) -> list[list[int]]:
    """One sampled response per prompt, through `llm_jax.inference.generate`; a stopped one keeps its eos."""
    stop = [eos_id] if cfg.stop_at_eos else []
    out = generate(lm_params, model_cfg, prompts, max_new_tokens=cfg.max_new_tokens,
                   sampling={"temperature": cfg.temperature}, stop_tokens=stop, seed=seed)
    return [tokens + ([eos_id] if reason == "stop" else []) for tokens, reason in zip(out.tokens, out.finish_reasons)]


def reward_model_fn(params, cfg: ModelConfig, pad_id: int = 0) -> RewardFn:
    """A `RewardFn` scoring prompt + response with a trained reward model (`reward.py`)."""
    score = jax.jit(functools.partial(reward_scores, cfg=cfg))

    def reward(prompts, responses):
        longest = max(len(p) + len(r) for p, r in zip(prompts, responses))
        if longest > cfg.max_seq_len:
            raise ValueError(f"a prompt + response of {longest} tokens exceeds the reward model's "
                             f"max_seq_len={cfg.max_seq_len}")
        width = min(cfg.max_seq_len, -(-longest // _WIDTH_BUCKET) * _WIDTH_BUCKET)
        return np.asarray(score(params, seqs=pack(prompts, responses, width, pad_id)))

    return reward


def _scores(reward_fn: RewardFn, prompts, responses) -> np.ndarray:
    scores = np.asarray(reward_fn(prompts, responses), np.float32)
    if scores.shape != (len(prompts),) or not np.all(np.isfinite(scores)):
        raise ValueError(f"reward_fn must return one finite score per response ({len(prompts)}), "
                         f"got shape {scores.shape}: {scores[:8]}")
    return scores


@dataclasses.dataclass
class PPOResult:
    params: dict  # the tuned policy (an LM parameter tree)
    value_head: dict
    history: list[dict]  # per logged iteration: score, kl, losses, clip fraction ...
    truncated_prompts: int  # prompts cut from the left to fit


def _rollout_seed(cfg, iteration: int) -> int:
    """`generate`'s seed for an iteration's rollouts. Row b samples with seed + b, so the
    iterations' seeds lie rollout_batch_size apart: no two rollouts of a run share a key."""
    return (cfg.seed * cfg.iterations + iteration - 1) * cfg.rollout_batch_size


def train_ppo(lm_params, model_cfg: ModelConfig, prompts: Sequence[Sequence[int]], reward_fn: RewardFn,
              cfg: PPOConfig, *, eos_id: int | None = None, pad_id: int = 0, reference_params=None,
              print_fn: Callable[[str], None] = print) -> PPOResult:
    """Tune `lm_params` with PPO on token-id `prompts`; the reference defaults to `lm_params`."""
    if cfg.stop_at_eos and eos_id is None:
        raise ValueError("stop_at_eos=true needs the tokenizer's eos_id (or set stop_at_eos=false)")
    reference_params = committed_like(lm_params if reference_params is None else reference_params, lm_params)
    prompts, truncated = fit_prompts(prompts, model_cfg, cfg.max_new_tokens)
    longest = max(len(p) for p in prompts)
    width = min(model_cfg.max_seq_len, -(-longest // _WIDTH_BUCKET) * _WIDTH_BUCKET + cfg.max_new_tokens)
    tuned, frozen = split_tuned(lm_params, model_cfg)
    policy = {"lm": tuned, "value_head": init_scalar_head(model_cfg.d_model)}
    # The schedule runs over every optimizer step: ppo_epochs passes of the rollout's minibatches per iteration.
    steps = cfg.iterations * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.minibatch_size)
    state = new_train_state(policy, optimizer(cfg.optim, steps), cfg.seed)
    frozen = committed_like(frozen, state.params)
    batches = index_batches(len(prompts), cfg.rollout_batch_size, cfg.seed)
    history = []
    for it in range(1, cfg.iterations + 1):
        batch = [prompts[i] for i in next(batches)]
        responses = sample_responses(with_frozen(state.params["lm"], frozen), model_cfg, batch, cfg,
                                     seed=_rollout_seed(cfg, it), eos_id=eos_id)
        scores = _scores(reward_fn, batch, responses)
        seqs = pack(batch, responses, width, pad_id)
        rollout, metrics = score_rollout(state.params, frozen, reference_params, seqs, scores, model_cfg=model_cfg,
                                         cfg=cfg)
        state, update_metrics = ppo_update(state, frozen, rollout, model_cfg=model_cfg, cfg=cfg)
        if it % cfg.log_every == 0 or it == cfg.iterations:
            fetched = jax.device_get({**metrics, **update_metrics})
            logged = {"iteration": it, **{k: float(v) for k, v in fetched.items()}}
            history.append(logged)
            print_fn(f"ppo iteration {it:>4}/{cfg.iterations} | score {logged['score']:+.4f} | kl {logged['kl']:.4f} | "
                     f"pg {logged['pg_loss']:+.4f} | vf {logged['vf_loss']:.4f} | clip {logged['clip_fraction']:.3f} | "
                     f"length {logged['response_length']:.1f}")
    return PPOResult(params=with_frozen(state.params["lm"], frozen), value_head=state.params["value_head"],
                     history=history, truncated_prompts=truncated)
