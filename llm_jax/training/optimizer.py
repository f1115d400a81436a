"""Optimizers (AdamW, Adafactor, Lion) with warmup + decay schedules and clipping, via optax."""

from __future__ import annotations

import jax
import optax

from llm_jax.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine or linear decay to `lr * min_lr_ratio` at `total_steps`."""
    if total_steps <= cfg.warmup_steps and cfg.schedule != "constant":
        raise ValueError(
            f"optim.warmup_steps={cfg.warmup_steps} leaves no steps to decay over in train.steps={total_steps}"
        )
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    decay_steps = total_steps - cfg.warmup_steps
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps == 0:
        return decay
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def _decay_mask(params):
    """Weight decay on matrices only: norms, biases and other vectors are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          mask=_decay_mask)
    elif cfg.name == "lion":
        opt = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_decay_mask)
    else:  # adafactor: factored second moments, optional momentum from b1
        opt = optax.adafactor(
            schedule,
            momentum=cfg.b1 if cfg.b1 > 0 else None,
            weight_decay_rate=cfg.weight_decay or None,
            weight_decay_mask=_decay_mask,
            multiply_by_parameter_scale=False,
        )
    if cfg.grad_clip is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt
