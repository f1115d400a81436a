"""A reward model: the LM with a scalar head, trained on preference pairs (Bradley-Terry).

    r(prompt, response) = head(final hidden state of the row's last real token)
    loss = -log sigmoid(r(chosen) - r(rejected))   (+ center_coef * mean((r_c + r_r)^2))

The last real token (the response's eos) has attended to the whole prompt and response,
so its hidden state summarises the row. Parameters are `{"lm": lm_params, "head":
{"kernel": [D], "bias": []}}`; the head starts at zero, so every score starts at 0 and
the loss at log 2. Held-out accuracy is the fraction of pairs ranked the right way.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.finetune.align_config import RewardConfig
from llm_jax.finetune.preference import IntervalLog, PreferenceData, index_batches
from llm_jax.finetune.sequences import (
    Sequences,
    committed_like,
    concat,
    init_scalar_head,
    last_token_hidden,
    lm_forward,
    map_rows,
    pairwise_accuracy,
    new_train_state,
    optimizer,
    scalar_head,
    split_tuned,
    with_frozen,
)
from llm_jax.training.step import apply_gradients


def init_reward_model(lm_params, cfg: ModelConfig) -> dict:
    """Reward-model parameters from a (trained) LM: its weights plus a zero scalar head."""
    return {"lm": lm_params, "head": init_scalar_head(cfg.d_model)}


def reward_scores(params, cfg: ModelConfig, seqs: Sequences):
    """[N] the reward of each prompt + response row."""
    _, hidden_BTD = lm_forward(params["lm"], cfg, seqs)
    return scalar_head(params["head"], last_token_hidden(hidden_BTD, seqs))


def bradley_terry_loss(chosen_B, rejected_B, center_coef: float = 0.0):
    """Mean -log sigmoid(r_chosen - r_rejected), and accuracy / margin metrics."""
    margin_B = chosen_B - rejected_B
    loss = -jnp.mean(jax.nn.log_sigmoid(margin_B))
    if center_coef:
        loss = loss + center_coef * jnp.mean(jnp.square(chosen_B + rejected_B))
    return loss, {"loss": loss, "accuracy": pairwise_accuracy(margin_B), "margin": jnp.mean(margin_B)}


def _pair_scores(params, cfg: ModelConfig, chosen: Sequences, rejected: Sequences):
    """Chosen and rejected rewards from one forward pass over both halves."""
    scores = reward_scores(params, cfg, concat(chosen, rejected))
    return scores[: chosen.num_rows], scores[chosen.num_rows:]


def _whole(params, frozen) -> dict:
    return {"lm": with_frozen(params["lm"], frozen), "head": params["head"]}


@functools.partial(jax.jit, static_argnames=("model_cfg", "center_coef"), donate_argnums=0)
def reward_train_step(state, frozen, chosen: Sequences, rejected: Sequences, *, model_cfg: ModelConfig,
                      center_coef: float = 0.0):
    """One Bradley-Terry step on a batch of pairs; metrics are of the batch before the update.

    `state.params` is {"lm": the tuned LM parameters, "head": ...}; `frozen` the rest of
    the LM ({} unless the model is a PEFT model, see `split_tuned`).
    """

    def loss_fn(params):
        return bradley_terry_loss(*_pair_scores(_whole(params, frozen), model_cfg, chosen, rejected), center_coef)

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    state, step_metrics = apply_gradients(state, grads, metrics["loss"])
    return state, {**metrics, **step_metrics}


@functools.partial(jax.jit, static_argnames=("model_cfg",))
def _score_pairs(params, chosen, rejected, *, model_cfg):
    return _pair_scores(params, model_cfg, chosen, rejected)


def evaluate_reward_model(params, cfg: ModelConfig, data: PreferenceData, batch_size: int = 32) -> dict:
    """Accuracy (pairs ranked right), mean margin and loss over all pairs of `data`."""
    score = lambda b: _score_pairs(params, *b, model_cfg=cfg)  # noqa: E731
    chosen, rejected = map_rows(score, (data.chosen, data.rejected), batch_size)
    _, metrics = bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected))
    return {k: float(v) for k, v in metrics.items()}


@dataclasses.dataclass
class RewardResult:
    params: dict  # {"lm": ..., "head": ...}
    history: list[dict]  # logged training metrics, with their step
    held_out: dict | None  # accuracy, margin, loss on the held-out pairs (None without any)
    held_out_before: dict | None  # the same before training


def train_reward_model(lm_params, model_cfg: ModelConfig, data: PreferenceData, cfg: RewardConfig,
                       print_fn: Callable[[str], None] = print) -> RewardResult:
    """Train a reward model from `lm_params` on `data`, holding out `cfg.validation_fraction`."""
    train, held_out = data.split(cfg.validation_fraction, cfg.seed)
    tuned, frozen = split_tuned(lm_params, model_cfg)
    state = new_train_state(init_reward_model(tuned, model_cfg), optimizer(cfg.optim, cfg.steps), cfg.seed)
    frozen = committed_like(frozen, state.params)
    evaluate = lambda p: None if held_out is None else evaluate_reward_model(  # noqa: E731
        _whole(p, frozen), model_cfg, held_out, cfg.eval_batch_size)
    before = evaluate(state.params)
    batches = index_batches(train.num_pairs, cfg.batch_size, cfg.seed)
    log = IntervalLog(cfg.log_every, cfg.steps)
    for step in range(1, cfg.steps + 1):
        batch = train.rows(next(batches))
        state, metrics = reward_train_step(state, frozen, batch.chosen, batch.rejected, model_cfg=model_cfg,
                                           center_coef=cfg.center_coef)
        logged = log.add(step, metrics)
        if logged is not None:
            print_fn(f"reward step {step:>5}/{cfg.steps} | loss {logged['loss']:.4f} | "
                     f"accuracy {logged['accuracy']:.3f} | margin {logged['margin']:+.3f}")
    after = evaluate(state.params)
    if after is not None:
        print_fn(f"held-out pairs ({held_out.num_pairs}): accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}"
                 f", margin {before['margin']:+.3f} -> {after['margin']:+.3f}")
    return RewardResult(params=_whole(state.params, frozen), history=log.history, held_out=after,
                        held_out_before=before)
