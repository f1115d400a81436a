"""Direct preference optimisation (Rafailov et al., 2023) on preference pairs.

    h = [log pi(y_c|x) - log pi_ref(y_c|x)] - [log pi(y_r|x) - log pi_ref(y_r|x)]
    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)      (eps: label_smoothing)

The reference model never changes, so its summed response log-probabilities are
computed once, for every pair, before the first step (`reference_logprobs`), and each
step runs only the policy: one forward pass over the chosen and rejected rows together.

`beta * h` is the implicit reward margin of the chosen response over the rejected one:
0 for every pair at the start (the policy is the reference); its mean and the fraction
of pairs where it is positive (accuracy) are what training should raise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.finetune.align_config import DPOConfig
from llm_jax.finetune.preference import IntervalLog, PreferenceData, index_batches
from llm_jax.finetune.sequences import (
    Sequences,
    committed_like,
    concat,
    map_rows,
    pairwise_accuracy,
    new_train_state,
    optimizer,
    response_logprob_sum,
    split_tuned,
    with_frozen,
)
from llm_jax.training.step import apply_gradients


def dpo_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, beta: float,
             label_smoothing: float = 0.0):
    """The (conservative) DPO loss of summed response log-probabilities, and its metrics."""
    chosen_reward_B = beta * (policy_chosen_B - ref_chosen_B)
    rejected_reward_B = beta * (policy_rejected_B - ref_rejected_B)
    margin_B = chosen_reward_B - rejected_reward_B
    loss_B = -(1 - label_smoothing) * jax.nn.log_sigmoid(margin_B) - label_smoothing * jax.nn.log_sigmoid(-margin_B)
    loss = jnp.mean(loss_B)
    return loss, {
        "loss": loss,
        "margin": jnp.mean(margin_B),
        "accuracy": pairwise_accuracy(margin_B),
        "chosen_reward": jnp.mean(chosen_reward_B),
        "rejected_reward": jnp.mean(rejected_reward_B),
    }


def _pair_logprobs(params, cfg: ModelConfig, chosen: Sequences, rejected: Sequences):
    logp = response_logprob_sum(params, cfg, concat(chosen, rejected))
    return logp[: chosen.num_rows], logp[chosen.num_rows:]


_pair_logprobs_jit = jax.jit(_pair_logprobs, static_argnames=("cfg",))


def reference_logprobs(ref_params, cfg: ModelConfig, data: PreferenceData, batch_size: int = 32):
    """(chosen [N], rejected [N]) summed response log-probabilities under the reference, once."""
    score = lambda b: _pair_logprobs_jit(ref_params, cfg, *b)  # noqa: E731
    return map_rows(score, (data.chosen, data.rejected), batch_size)


@functools.partial(jax.jit, static_argnames=("model_cfg", "beta", "label_smoothing"), donate_argnums=0)
def dpo_train_step(state, frozen, chosen: Sequences, rejected: Sequences, ref_chosen_B, ref_rejected_B, *,
                   model_cfg: ModelConfig, beta: float, label_smoothing: float = 0.0):
    """One DPO step of the tuned parameters (`state.params`; `frozen`: the rest, see
    `split_tuned`); metrics are of the batch before the update."""

    def loss_fn(params):
        policy_chosen, policy_rejected = _pair_logprobs(with_frozen(params, frozen), model_cfg, chosen, rejected)
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen_B, ref_rejected_B, beta, label_smoothing)

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    state, step_metrics = apply_gradients(state, grads, metrics["loss"])
    return state, {**metrics, **step_metrics}


def evaluate_dpo(params, cfg: ModelConfig, data: PreferenceData, reference: tuple, beta: float,
                 batch_size: int = 32) -> dict:
    """DPO loss, implicit-reward margin and accuracy of `params` over all pairs of `data`."""
    policy = reference_logprobs(params, cfg, data, batch_size)
    _, metrics = dpo_loss(*map(jnp.asarray, (*policy, *reference)), beta)
    return {k: float(v) for k, v in metrics.items()}


@dataclasses.dataclass
class DPOResult:
    params: dict  # the tuned policy (an LM parameter tree)
    history: list[dict]  # logged training metrics, with their step
    train: dict  # loss, margin, accuracy over all training pairs after training
    held_out: dict | None  # the same on the held-out pairs (None without any)


def train_dpo(params, model_cfg: ModelConfig, data: PreferenceData, cfg: DPOConfig, *, reference_params=None,
              print_fn: Callable[[str], None] = print) -> DPOResult:
    """Tune the LM `params` with DPO on `data`; the reference defaults to `params` themselves."""
    reference_params = committed_like(params if reference_params is None else reference_params, params)
    train, held_out = data.split(cfg.validation_fraction, cfg.seed)
    ref_train = reference_logprobs(reference_params, model_cfg, train, cfg.eval_batch_size)
    ref_held = None if held_out is None else reference_logprobs(reference_params, model_cfg, held_out,
                                                                cfg.eval_batch_size)
    tuned, frozen = split_tuned(params, model_cfg)
    state = new_train_state(tuned, optimizer(cfg.optim, cfg.steps), cfg.seed)
    frozen = committed_like(frozen, state.params)
    batches = index_batches(train.num_pairs, cfg.batch_size, cfg.seed)
    log = IntervalLog(cfg.log_every, cfg.steps)
    for step in range(1, cfg.steps + 1):
        index = next(batches)
        batch = train.rows(index)
        state, metrics = dpo_train_step(state, frozen, batch.chosen, batch.rejected, ref_train[0][index],
                                        ref_train[1][index], model_cfg=model_cfg, beta=cfg.beta,
                                        label_smoothing=cfg.label_smoothing)
        logged = log.add(step, metrics)
        if logged is not None:
            print_fn(f"dpo step {step:>5}/{cfg.steps} | loss {logged['loss']:.4f} | margin {logged['margin']:+.4f} | "
                     f"accuracy {logged['accuracy']:.3f}")
    policy = with_frozen(state.params, frozen)
    evaluate = lambda d, ref: evaluate_dpo(policy, model_cfg, d, ref, cfg.beta, cfg.eval_batch_size)  # noqa: E731
    result = DPOResult(params=policy, history=log.history, train=evaluate(train, ref_train),
                       held_out=None if held_out is None else evaluate(held_out, ref_held))
    for name, m in (("training", result.train), ("held-out", result.held_out)):
        if m is not None:
            print_fn(f"{name} pairs: margin {m['margin']:+.4f}, accuracy {m['accuracy']:.3f}, loss {m['loss']:.4f}")
    return result
