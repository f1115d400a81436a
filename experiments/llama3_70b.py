"""Llama 3 70B: 80 layers, 64 query / 8 kv heads, d_model 8192, 128K vocabulary."""

from llm_jax.config import DataConfig, ExperimentConfig, MeshConfig, OptimConfig, TrainConfig
from llm_jax.models.presets import llama

PUBLISHED_PARAMS = 70_553_706_496


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="llama3_70b",
        model=llama(
            d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672,
            vocab_size=128256, max_seq_len=8192, rope_theta=500_000.0, remat="full",
        ),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=8),
        optim=OptimConfig(lr=1.5e-4, warmup_steps=2000, eps=1e-5),
        data=DataConfig(seq_len=8192),
        train=TrainConfig(steps=500_000, batch_size=512),
    )
