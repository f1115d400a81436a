"""The fine-tuning train step: gradients, clipping and optimizer state for the tuned parameters only.

    state.params = tuned half (LoRA factors, adapters, prompts; everything for full tuning)
    frozen       = the base weights, an argument of the step, never differentiated

Same contract as `llm_jax.training.step`: a batch of [B, T] `inputs`, `targets` and
optional `loss_mask`, `segment_ids`, `positions`; token-weighted microbatch accumulation,
so any number of microbatches gives the same update; a non-finite step changes nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig, OptimConfig
from llm_jax.finetune import peft
from llm_jax.models import Transformer
from llm_jax.training.losses import cross_entropy_loss
from llm_jax.training.optimizer import make_optimizer
from llm_jax.training.step import TrainState, accumulate_gradients, apply_summed_gradients


def uses_dropout(cfg: ModelConfig) -> bool:
    return cfg.dropout > 0 or cfg.attention_dropout > 0 or (cfg.peft.uses_lora and cfg.peft.lora_dropout > 0)


def summed_loss(tuned, frozen, batch, rng, model_cfg: ModelConfig, z_loss: float = 0.0):
    """Token-summed next-token loss of the combined model on one (micro)batch, and its sums."""
    train = rng is not None and uses_dropout(model_cfg)
    logits, _ = Transformer(model_cfg).apply(
        {"params": peft.combine(tuned, frozen)},
        batch["inputs"],
        positions_BT=batch.get("positions"),
        segment_ids_BT=batch.get("segment_ids"),
        deterministic=not train,
        rngs={"dropout": rng} if train else None,
    )
    _, sums = cross_entropy_loss(logits, batch["targets"], batch.get("loss_mask"), z_loss)
    return sums["loss_sum"] + z_loss * sums["z_loss_sum"], sums


def _train_step(state: TrainState, frozen, batch, *, model_cfg: ModelConfig, microbatches: int = 1,
                z_loss: float = 0.0):
    rng, step_rng = jax.random.split(state.rng)
    loss = lambda tuned, micro, key: summed_loss(tuned, frozen, micro, key, model_cfg, z_loss)  # noqa: E731
    grads, sums = accumulate_gradients(loss, state.params, batch, step_rng, microbatches)
    return apply_summed_gradients(state.replace(rng=rng), grads, sums)


train_step = jax.jit(_train_step, static_argnames=("model_cfg", "microbatches", "z_loss"), donate_argnums=0)


def sharded_train_step(state: TrainState, frozen, batch_sharding: jax.sharding.Sharding, *, model_cfg: ModelConfig,
                       microbatches: int = 1, z_loss: float = 0.0):
    """`train_step` compiled to keep the state and the frozen weights where they are."""
    where = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    step = functools.partial(_train_step, model_cfg=model_cfg, microbatches=microbatches, z_loss=z_loss)
    return jax.jit(step, in_shardings=(where(state), where(frozen), batch_sharding),
                   out_shardings=(where(state), replicated), donate_argnums=0)


@functools.partial(jax.jit, static_argnames=("model_cfg",))
def eval_step(tuned, frozen, batch, *, model_cfg: ModelConfig):
    """Summed loss and token count of a batch (response tokens only, for SFT batches)."""
    _, sums = summed_loss(tuned, frozen, batch, None, model_cfg)
    return {"loss_sum": sums["loss_sum"], "tokens": sums["tokens"]}


def init_state(tuned, optim_cfg: OptimConfig, total_steps: int, rng: jax.Array) -> TrainState:
    """A train state over the tuned parameters: optimizer moments for those alone."""
    tx = make_optimizer(optim_cfg, total_steps)
    counter = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    return TrainState(step=counter(), params=tuned, opt_state=tx.init(tuned), rng=rng, skipped=counter(),
                      bad_in_a_row=counter(), tx=tx)
