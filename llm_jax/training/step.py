"""The train state and the jitted train / eval steps.

A batch is a dict of [B, T] arrays: `inputs`, `targets`, and optionally `loss_mask`,
`segment_ids`, `positions` (packed documents) and `prefix_mask` (prefix-LM).

Gradient accumulation scans over microbatches and sums *token-weighted* losses and
gradients before dividing by the batch's token count, so any number of microbatches
gives the same update as the whole batch at once. A step whose loss or gradients are
not finite leaves the parameters and optimizer state untouched and is counted.

What the step minimises is a parameter, `loss_fn` (an `Objective`, below): next-token
cross-entropy by default, or e.g. knowledge distillation to a frozen teacher
(`llm_jax.finetune.distill.DistillationObjective`), whose parameters come in as the
step's `teacher` argument.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from llm_jax.config import ModelConfig, OptimConfig
from llm_jax.models import Transformer, init_params
from llm_jax.parallel import offload
from llm_jax.training.losses import cross_entropy_loss
from llm_jax.training.optimizer import make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] steps taken, skipped ones included
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array  # [] steps skipped for a non-finite loss or gradient, in total
    bad_in_a_row: jax.Array  # [] consecutive skipped steps up to now
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def init_train_state(model_cfg: ModelConfig, optim_cfg: OptimConfig, total_steps: int, rng: jax.Array) -> TrainState:
    init_rng, rng = jax.random.split(rng)
    params = init_params(model_cfg, init_rng)
    tx = make_optimizer(optim_cfg, total_steps)
    # Separate buffers for each counter: the train step donates the whole state.
    counter = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    return TrainState(step=counter(), params=params, opt_state=tx.init(params), rng=rng, skipped=counter(),
                      bad_in_a_row=counter(), tx=tx)


# What a train step minimises, from the model's logits on one (micro)batch:
# loss_fn(logits_BTV, batch, teacher) -> (token-summed value to differentiate, token-summed
# metrics). The metrics hold `loss_sum` (the loss reported, and checked for finiteness) and
# `tokens`; any other `<name>_sum` is reported per token as `<name>`. `teacher` is the
# frozen pytree the step was given (None for plain language modelling). Objectives are
# hashable (frozen dataclasses): they are static arguments of the jitted step.
Objective = Callable[[jax.Array, dict, Any], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class NextTokenLoss:
    """The default objective: cross-entropy on `targets`, plus `z_loss` * mean log(Z)^2."""

    z_loss: float = 0.0

    def __call__(self, logits_BTV, batch, teacher=None):
        _, sums = cross_entropy_loss(logits_BTV, batch["targets"], batch.get("loss_mask"), self.z_loss)
        return (sums["loss_sum"] + self.z_loss * sums["z_loss_sum"],
                {"loss_sum": sums["loss_sum"], "log_z_squared_sum": sums["z_loss_sum"], "tokens": sums["tokens"]})


def _summed_loss(params, batch, rng, model_cfg: ModelConfig, z_loss: float, deterministic: bool, layer_runner=None,
                 loss_fn: Objective | None = None, teacher=None):
    """Token-summed loss of one (micro)batch, and its metrics."""
    logits, _ = Transformer(model_cfg, layer_runner=layer_runner).apply(
        {"params": params},
        batch["inputs"],
        positions_BT=batch.get("positions"),
        segment_ids_BT=batch.get("segment_ids"),
        prefix_mask_BT=batch.get("prefix_mask"),
        deterministic=deterministic,
        rngs=None if deterministic else {"dropout": rng},
    )
    return (loss_fn or NextTokenLoss(z_loss))(logits, batch, teacher)


def accumulate_gradients(loss_fn: Callable, params, batch, rng, microbatches: int):
    """Gradients of `loss_fn(params, microbatch, key) -> (loss, metrics)` and its metrics,
    summed over `microbatches` slices of the batch taken one at a time (a scan)."""
    grad_fn = jax.grad(loss_fn, has_aux=True)
    split = jax.tree.map(lambda x: x.reshape((microbatches, -1) + x.shape[1:]), batch)
    keys = jax.random.split(rng, microbatches)

    def one(carry, inputs):
        return jax.tree.map(jnp.add, carry, grad_fn(params, *inputs)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    # The objective names its metrics; their shapes come from tracing one microbatch.
    first = jax.tree.map(lambda x: x[0], (split, keys))
    metric_shapes = jax.eval_shape(lambda m, k: loss_fn(params, m, k)[1], *first)
    zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    (grads, metrics), _ = jax.lax.scan(one, (zeros, zero_metrics), (split, keys))
    return grads, metrics


def _accumulated_grads(params, batch, rng, model_cfg, microbatches: int, z_loss: float, layer_runner=None,
                       loss_fn: Objective | None = None, teacher=None):
    """The language model's summed gradients and metrics (see `accumulate_gradients`)."""
    deterministic = model_cfg.dropout == 0 and model_cfg.attention_dropout == 0
    loss = lambda p, micro, key: _summed_loss(p, micro, key, model_cfg, z_loss, deterministic,  # noqa: E731
                                             layer_runner, loss_fn, teacher)
    return accumulate_gradients(loss, params, batch, rng, microbatches)


def _train_step(state: TrainState, batch, teacher=None, *, model_cfg: ModelConfig, microbatches: int = 1,
                z_loss: float = 0.0, layer_runner=None, loss_fn: Objective | None = None):
    """One optimizer step; returns the new state and f32 scalar metrics (jitted below).

    `loss_fn` (default: `NextTokenLoss(z_loss)`) is what is minimised; `teacher` is passed
    to it unchanged and never differentiated."""
    rng, step_rng = jax.random.split(state.rng)
    grads, sums = _accumulated_grads(state.params, batch, step_rng, model_cfg, microbatches, z_loss, layer_runner,
                                     loss_fn, teacher)
    new_state, metrics = apply_summed_gradients(state.replace(rng=rng), grads, sums)
    tokens = jnp.maximum(sums["tokens"], 1.0)
    # The objective's other per-token metrics: log_z_squared (what z_loss penalises), or
    # a distillation's kl_to_teacher and label_ce.
    metrics.update({name[:-len("_sum")]: v / tokens for name, v in sums.items()
                    if name.endswith("_sum") and name != "loss_sum"})
    return new_state, metrics


def apply_summed_gradients(state: TrainState, grads, sums) -> tuple[TrainState, dict]:
    """`apply_gradients` for token-summed gradients and `sums` (`loss_sum`, `tokens`): both
    divided by the batch's token count first. Metrics: loss, the step's, and tokens."""
    tokens = jnp.maximum(sums["tokens"], 1.0)
    loss = sums["loss_sum"] / tokens
    new_state, step_metrics = apply_gradients(state, jax.tree.map(lambda g: g / tokens, grads), loss)
    return new_state, {"loss": loss, **step_metrics, "tokens": sums["tokens"]}


def apply_gradients(state: TrainState, grads, loss) -> tuple[TrainState, dict]:
    """One optimizer step; a non-finite loss or gradient leaves params and moments as they were.

    Every train step in the project (pre-training, fine-tuning, alignment) goes through
    here, so they all skip and count bad steps alike.
    """
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    # A conditional, not a select of old and new: selecting made XLA copy every moment of
    # the (donated) optimizer state first, 72 copies per step for the baby GPT.
    def update(params, opt_state):
        updates, opt_state = state.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o), state.params, state.opt_state)
    state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        skipped=state.skipped + (~finite).astype(jnp.int32),
        bad_in_a_row=jnp.where(finite, 0, state.bad_in_a_row + 1),
    )
    return state, {"grad_norm": grad_norm, "skipped": (~finite).astype(jnp.float32),
                   "bad_in_a_row": state.bad_in_a_row}


# The state is donated: its buffers are reused for the new state.
train_step = jax.jit(_train_step, static_argnames=("model_cfg", "microbatches", "z_loss", "loss_fn"),
                     donate_argnums=0)


def sharded_train_step(state: TrainState, batch_sharding: jax.sharding.Sharding, *, model_cfg: ModelConfig,
                       microbatches: int = 1, z_loss: float = 0.0, layer_runner=None,
                       loss_fn: Objective | None = None, teacher=None):
    """`train_step` compiled to keep the state exactly where it is (e.g. ZeRO-1 parameters
    stay unsplit even though their updates come from a split optimizer state).

    `layer_runner` replaces the model's layer scan, e.g. with a pipeline schedule
    (`llm_jax.parallel.pipeline`). A `teacher` (the frozen parameters `loss_fn` reads)
    stays where it is too, and is bound: the result is still called as `step(state, batch)`."""
    where = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    state_shardings = where(state)
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    step = functools.partial(_train_step, model_cfg=model_cfg, microbatches=microbatches, z_loss=z_loss,
                             layer_runner=layer_runner, loss_fn=loss_fn)
    step = offload.optimizer_on_device(step, state_shardings.opt_state)  # no-op unless it lives on the host
    if teacher is None:
        return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, replicated), donate_argnums=0)
    # An argument, not a closure: a captured array would be baked into the program as a constant.
    jitted = jax.jit(step, in_shardings=(state_shardings, batch_sharding, where(teacher)),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)
    return lambda state, batch: jitted(state, batch, teacher)


@functools.partial(jax.jit, static_argnames=("model_cfg",))
def eval_step(params, batch, *, model_cfg: ModelConfig):
    """Summed validation loss and token count (divide after summing over batches)."""
    _, metrics = _summed_loss(params, batch, None, model_cfg, 0.0, deterministic=True)
    return {"loss_sum": metrics["loss_sum"], "tokens": metrics["tokens"]}


def train_state_shardings(abstract_state: TrainState, param_shardings, replicated: jax.sharding.NamedSharding,
                          shard_params: bool = True):
    """Shardings for a whole TrainState: optimizer moments follow their parameter.

    Optimizer leaves shaped like their parameter (Adam/Lion moments) take its sharding;
    anything else (step counts, Adafactor's factored statistics) is replicated. With
    `shard_params=False` (ZeRO-1) the parameters drop their `fsdp` split and only the
    optimizer state keeps it.
    """
    shapes = jax.tree.map(lambda x: x.shape, abstract_state.params)

    def like_param(sharding, shape, leaf):
        return sharding if leaf.shape == shape else replicated

    opt = optax.tree_map_params(
        abstract_state.tx, lambda leaf, sharding, shape: like_param(sharding, shape, leaf),
        abstract_state.opt_state, param_shardings, shapes,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x),
    )
    params = param_shardings if shard_params else jax.tree.map(_without_fsdp, param_shardings)
    return abstract_state.replace(step=replicated, params=params, opt_state=opt, rng=replicated,
                                  skipped=replicated, bad_in_a_row=replicated)


def _without_fsdp(sharding: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    def drop(entry):
        if entry == "fsdp":
            return None
        if isinstance(entry, tuple):
            kept = tuple(a for a in entry if a != "fsdp")
            return kept if kept else None
        return entry

    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*map(drop, sharding.spec)))


def init_sharded_train_state(model_cfg: ModelConfig, optim_cfg: OptimConfig, total_steps: int, rng: jax.Array,
                             mesh: jax.sharding.Mesh, param_shardings, shard_params: bool = True,
                             offload_optimizer: bool = False) -> TrainState:
    """`init_train_state` compiled with output shardings: no array is ever whole on one device.

    `offload_optimizer` puts the optimizer state in pinned host memory (`llm_jax.parallel.offload`)."""
    init = functools.partial(init_train_state, model_cfg, optim_cfg, total_steps)
    abstract = jax.eval_shape(init, rng)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = train_state_shardings(abstract, param_shardings, replicated, shard_params)
    if offload_optimizer:
        shardings = offload.optimizer_state_on_host(shardings)
    return jax.jit(init, out_shardings=shardings)(rng)
