"""Knowledge distillation (Hinton et al., 2015): a student trained on a teacher's soft targets.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * CE(student, targets)                  per unmasked token, averaged

`distillation_loss` is the loss alone, on logits, returning token-summed metrics the
way `llm_jax.training.losses.cross_entropy_loss` does. `DistillationObjective` is that
loss as an objective of `llm_jax.training.step`: the frozen teacher runs inside the step,
so its logits are never stored, on the usual batches (`inputs`, `targets`, optional
`loss_mask`, `segment_ids`, `positions`, `prefix_mask`) and `TrainState`, with the same
skipping of non-finite steps. `distill_train_step` is that step for one batch;
`llm-jax train` distils the same way (`train.distill_from`), with its mesh,
microbatches and checkpoints. Teacher and student share the vocabulary (and the
tokenizer), not necessarily the architecture.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.finetune.align_config import DistillConfig
from llm_jax.models import Transformer
from llm_jax.training.step import train_step


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


def distill_train_step(state, teacher_params, batch, *, student_cfg: ModelConfig, teacher_cfg: ModelConfig,
                       cfg: DistillConfig):
    """One optimizer step of the student (`state`, a `TrainState`, donated) towards the frozen
    teacher: the training package's `train_step` minimising a `DistillationObjective`.

    Metrics: the mixed `loss`, `kl_to_teacher` and `label_ce` per token, `tokens`, and the
    step's own (grad_norm, skipped, bad_in_a_row)."""
    _check_vocab(student_cfg, teacher_cfg)
    return train_step(state, batch, teacher_params, model_cfg=student_cfg,
                      loss_fn=DistillationObjective(teacher_cfg, cfg))
