"""GPT-2 large (774M): 36 layers, 20 heads, d_model 1280."""

from llm_jax.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from llm_jax.models.presets import gpt2

PUBLISHED_PARAMS = 774_030_080


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="gpt2_774m",
        model=gpt2(d_model=1280, n_layers=36, n_heads=20, remat="save_dots_no_batch"),
        optim=OptimConfig(lr=2.5e-4, warmup_steps=2000),
        data=DataConfig(seq_len=1024),
        train=TrainConfig(steps=600_000, batch_size=480, microbatches=40),
    )
