"""Training: losses, optimizers and schedules, and the jitted train / eval steps."""

from llm_jax.training.losses import cross_entropy_loss
from llm_jax.training.optimizer import learning_rate_schedule, make_optimizer
from llm_jax.training.step import TrainState, eval_step, init_train_state, train_step

__all__ = [
    "TrainState",
    "cross_entropy_loss",
    "eval_step",
    "init_train_state",
    "learning_rate_schedule",
    "make_optimizer",
    "train_step",
]
