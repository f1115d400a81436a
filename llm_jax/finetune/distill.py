"""Knowledge distillation (Hinton et al., 2015): a student trained on a teacher's soft targets.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * CE(student, targets)                  per unmasked token, averaged

`distillation_loss` is the loss alone, on logits, returning token-summed metrics the
way `llm_jax.training.losses.cross_entropy_loss` does. `distill_train_step` is the
training package's step for it: the same batches (`inputs`, `targets`, optional
`loss_mask`, `segment_ids`, `positions`, `prefix_mask`), the same `TrainState`, the same
skipping of non-finite steps; the frozen teacher runs inside the step, so its logits
are never stored. Teacher and student share the vocabulary (and the tokenizer), not
necessarily the architecture. `DistillationObjective` is the same loss as an objective
of `llm_jax.training.step`, which is how `llm-jax train` distils (`train.distill_from`),
with its mesh, microbatches and checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.finetune.align_config import DistillConfig
from llm_jax.models import Transformer
from llm_jax.training.step import apply_gradients


def distillation_loss(student_logits_BTV, teacher_logits_BTV, targets_BT, mask_BT=None, *,
                      temperature: float = 2.0, alpha: float = 0.5):
    """(mean loss, token-summed metrics: loss_sum, kl_sum, ce_sum, tokens)."""
    student = student_logits_BTV.astype(jnp.float32)
    mask_BT = jnp.ones(targets_BT.shape, jnp.float32) if mask_BT is None else mask_BT.astype(jnp.float32)
    teacher_logp_BTV = jax.nn.log_softmax(teacher_logits_BTV.astype(jnp.float32) / temperature)
    student_logp_BTV = jax.nn.log_softmax(student / temperature)
    kl_BT = jnp.sum(jnp.exp(teacher_logp_BTV) * (teacher_logp_BTV - student_logp_BTV), axis=-1)
    log_z_BT = jax.nn.logsumexp(student, axis=-1)
    ce_BT = log_z_BT - jnp.take_along_axis(student, targets_BT[..., None], axis=-1)[..., 0]
    # T^2: the soft term's gradients shrink as 1 / T^2; this keeps them on the CE's scale.
    loss_BT = alpha * temperature**2 * kl_BT + (1 - alpha) * ce_BT
    metrics = {"loss_sum": jnp.sum(loss_BT * mask_BT), "kl_sum": jnp.sum(kl_BT * mask_BT),
               "ce_sum": jnp.sum(ce_BT * mask_BT), "tokens": jnp.sum(mask_BT)}
    return metrics["loss_sum"] / jnp.maximum(metrics["tokens"], 1.0), metrics


def _logits(params, cfg: ModelConfig, batch):
    logits_BTV, _ = Transformer(cfg).apply(
        {"params": params}, batch["inputs"], positions_BT=batch.get("positions"),
        segment_ids_BT=batch.get("segment_ids"), prefix_mask_BT=batch.get("prefix_mask"))
    return logits_BTV


@dataclasses.dataclass(frozen=True)
class DistillationObjective:
    """`distillation_loss` as the train step's objective (`llm_jax.training.step.Objective`).

    The step passes the frozen teacher's parameters in as `teacher`; the teacher scores
    each (micro)batch as the student does, its logits held constant."""

    teacher_cfg: ModelConfig
    cfg: DistillConfig

    def __call__(self, student_logits_BTV, batch, teacher):
        teacher_logits_BTV = jax.lax.stop_gradient(_logits(teacher, self.teacher_cfg, batch))
        _, sums = distillation_loss(student_logits_BTV, teacher_logits_BTV, batch["targets"], batch.get("loss_mask"),
                                    temperature=self.cfg.temperature, alpha=self.cfg.alpha)
        return sums["loss_sum"], {"loss_sum": sums["loss_sum"], "kl_to_teacher_sum": sums["kl_sum"],
                                  "label_ce_sum": sums["ce_sum"], "tokens": sums["tokens"]}


def _check_vocab(student_cfg: ModelConfig, teacher_cfg: ModelConfig) -> None:
    if student_cfg.vocab_size != teacher_cfg.vocab_size:
        raise ValueError(f"student vocab_size={student_cfg.vocab_size} differs from the teacher's "
                         f"{teacher_cfg.vocab_size}; distillation needs one vocabulary")


@functools.partial(jax.jit, static_argnames=("student_cfg", "teacher_cfg", "cfg"), donate_argnums=0)
def distill_train_step(state, teacher_params, batch, *, student_cfg: ModelConfig, teacher_cfg: ModelConfig,
                       cfg: DistillConfig):
    """One optimizer step of the student (`state`, a `TrainState`) towards the frozen teacher."""
    _check_vocab(student_cfg, teacher_cfg)
    teacher_logits_BTV = jax.lax.stop_gradient(_logits(teacher_params, teacher_cfg, batch))

    def loss_fn(params):
        return distillation_loss(_logits(params, student_cfg, batch), teacher_logits_BTV, batch["targets"],
                                 batch.get("loss_mask"), temperature=cfg.temperature, alpha=cfg.alpha)

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, step_metrics = apply_gradients(state, grads, loss)
    tokens = jnp.maximum(sums["tokens"], 1.0)
    return state, {"loss": loss, "kl": sums["kl_sum"] / tokens, "ce": sums["ce_sum"] / tokens,
                   "tokens": sums["tokens"], **step_metrics}
