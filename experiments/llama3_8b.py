"""Llama 3 8B: 32 layers, 32 query / 8 kv heads (GQA), d_model 4096, 128K vocabulary."""

from llm_jax.config import DataConfig, ExperimentConfig, MeshConfig, OptimConfig, TrainConfig
from llm_jax.models.presets import llama

PUBLISHED_PARAMS = 8_030_261_248


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="llama3_8b",
        model=llama(
            d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
            vocab_size=128256, max_seq_len=8192, rope_theta=500_000.0, remat="save_dots_no_batch",
        ),
        mesh=MeshConfig(data=1, fsdp=-1),
        optim=OptimConfig(lr=3e-4, warmup_steps=2000, eps=1e-5),
        data=DataConfig(seq_len=8192),
        train=TrainConfig(steps=500_000, batch_size=512),
    )
