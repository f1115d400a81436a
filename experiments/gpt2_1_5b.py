"""GPT-2 XL (1.5B; 1.56B counted exactly): 48 layers, 25 heads, d_model 1600."""

from llm_jax.config import DataConfig, ExperimentConfig, MeshConfig, OptimConfig, TrainConfig
from llm_jax.models.presets import gpt2

PUBLISHED_PARAMS = 1_557_611_200


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="gpt2_1_5b",
        model=gpt2(d_model=1600, n_layers=48, n_heads=25, remat="save_dots_no_batch"),
        mesh=MeshConfig(data=1, fsdp=-1),
        optim=OptimConfig(lr=2e-4, warmup_steps=2000),
        data=DataConfig(seq_len=1024),
        train=TrainConfig(steps=600_000, batch_size=480, microbatches=40),
    )
