"""Mistral 7B v0.1: Llama-style with 8 kv heads and 4096-token sliding-window attention."""

from llm_jax.config import DataConfig, ExperimentConfig, MeshConfig, OptimConfig, TrainConfig
from llm_jax.models.presets import llama

PUBLISHED_PARAMS = 7_241_732_096


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="mistral_7b",
        model=llama(
            d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
            vocab_size=32000, max_seq_len=32768, sliding_window=4096, remat="save_dots_no_batch",
        ),
        mesh=MeshConfig(data=1, fsdp=-1),
        optim=OptimConfig(lr=3e-4, warmup_steps=2000, eps=1e-5),
        data=DataConfig(seq_len=8192),
        train=TrainConfig(steps=500_000, batch_size=512),
    )
