"""GPT-2 medium (350M; 355M counted exactly): 24 layers, 16 heads, d_model 1024."""

from llm_jax.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from llm_jax.models.presets import gpt2

PUBLISHED_PARAMS = 354_823_168


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="gpt2_350m",
        model=gpt2(d_model=1024, n_layers=24, n_heads=16),
        optim=OptimConfig(lr=3e-4, warmup_steps=2000),
        data=DataConfig(seq_len=1024),
        train=TrainConfig(steps=600_000, batch_size=480, microbatches=40),
    )
