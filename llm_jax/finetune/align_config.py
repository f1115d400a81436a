"""Frozen, validated configs of the alignment objectives: reward model, DPO, PPO, distillation.

Each is built (and checked) before anything is traced, and takes dotted `key=value`
overrides on the command line through `llm_jax.config.override`, e.g. `beta=0.2
steps=200 optim.lr=1e-6`. Errors name the field as it is typed there.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from llm_jax.config import ConfigError, OptimConfig

# Alignment fine-tunes a trained model: small constant steps, no decay of the weights
# towards zero (the reference point is the starting model, not the origin).
ALIGN_OPTIM = OptimConfig(lr=1e-5, schedule="constant", warmup_steps=0, weight_decay=0.0, grad_clip=1.0)


def _check(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field}: {message}")


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(value > 0, name, f"must be positive, got {value}")


@dataclasses.dataclass(frozen=True)
class PreferenceTrainConfig:
    """What reward-model and DPO training share: steps, batches, the held-out split."""

    steps: int = 100
    batch_size: int = 8  # pairs per step
    # Tokens per prompt + response; None: the model's max_seq_len. Longer responses are cut.
    max_len: Optional[int] = None
    validation_fraction: float = 0.1  # pairs held out for the reported accuracy and margin
    eval_batch_size: int = 32  # pairs per forward pass when scoring (reference, held out)
    log_every: int = 10
    seed: int = 0
    optim: OptimConfig = ALIGN_OPTIM

    def __post_init__(self):
        _positive(self, "steps", "batch_size", "eval_batch_size", "log_every")
        _check(self.max_len is None or self.max_len >= 2, "max_len", f"must be >= 2 or None, got {self.max_len}")
        _check(0 <= self.validation_fraction < 1, "validation_fraction",
               f"must be in [0, 1), got {self.validation_fraction}")


@dataclasses.dataclass(frozen=True)
class RewardConfig(PreferenceTrainConfig):
    """A scalar head on the LM trained with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected)."""

    # Adds center_coef * mean((r_chosen + r_rejected)^2): the loss sees only differences,
    # so this pins the scores' offset near zero (useful as a PPO reward).
    center_coef: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        _check(self.center_coef >= 0, "center_coef", f"must be >= 0, got {self.center_coef}")


@dataclasses.dataclass(frozen=True)
class DPOConfig(PreferenceTrainConfig):
    """Direct preference optimisation against the frozen starting model."""

    # Strength of the implicit KL constraint: the implicit reward is beta * log(pi / pi_ref).
    beta: float = 0.1
    # Conservative DPO: the probability that a pair's label is flipped (0: plain DPO).
    label_smoothing: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        _check(self.beta > 0, "beta", f"must be positive, got {self.beta}")
        _check(0 <= self.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """RLHF with PPO: sample, score, penalise the KL to the reference, several clipped epochs."""

    iterations: int = 50  # rollout batches
    rollout_batch_size: int = 16  # prompts sampled (one response each) per iteration
    minibatch_size: int = 8
    ppo_epochs: int = 4  # passes over each rollout batch
    max_new_tokens: int = 32
    temperature: float = 1.0  # sampling temperature; log-probabilities use the same one
    stop_at_eos: bool = True  # a response ends at the tokenizer's eos id (kept as its last action)
    kl_coef: float = 0.05  # per-token reward -kl_coef * (log pi - log pi_ref)
    gamma: float = 1.0
    gae_lambda: float = 0.95
    clip_ratio: float = 0.2  # policy ratio clipped to [1 - clip_ratio, 1 + clip_ratio]
    clip_value: float = 0.2  # value predictions move at most this far from the rollout's
    vf_coef: float = 0.1  # weight of the value loss (the value head shares the LM's trunk)
    whiten_advantages: bool = True
    log_every: int = 1
    seed: int = 0
    optim: OptimConfig = ALIGN_OPTIM

    def __post_init__(self):
        _positive(self, "iterations", "rollout_batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens",
                  "temperature", "log_every")
        _check(self.rollout_batch_size % self.minibatch_size == 0, "minibatch_size",
               f"minibatch_size={self.minibatch_size} must divide rollout_batch_size={self.rollout_batch_size}")
        _check(self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef}")
        _check(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1], got {self.gamma}")
        _check(0 <= self.gae_lambda <= 1, "gae_lambda", f"must be in [0, 1], got {self.gae_lambda}")
        _check(0 < self.clip_ratio < 1, "clip_ratio", f"must be in (0, 1), got {self.clip_ratio}")
        _check(self.clip_value > 0, "clip_value", f"must be positive, got {self.clip_value}")
        _check(self.vf_coef >= 0, "vf_coef", f"must be >= 0, got {self.vf_coef}")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""

    temperature: float = 2.0  # softens both distributions; T^2 keeps the gradient scale (Hinton et al.)
    alpha: float = 0.5  # weight of the soft-target term; 1 - alpha goes to the hard labels

    def __post_init__(self):
        _check(self.temperature > 0, "temperature", f"must be positive, got {self.temperature}")
        _check(0 <= self.alpha <= 1, "alpha", f"must be in [0, 1], got {self.alpha}")
