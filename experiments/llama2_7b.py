"""Llama 2 7B (Touvron et al. 2023): 32 layers, 32 heads (MHA), d_model 4096, context 4096."""

from llm_jax.config import DataConfig, ExperimentConfig, MeshConfig, OptimConfig, TrainConfig
from llm_jax.models.presets import llama

PUBLISHED_PARAMS = 6_738_415_616


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="llama2_7b",
        model=llama(
            d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
            vocab_size=32000, max_seq_len=4096, remat="save_dots_no_batch",
        ),
        mesh=MeshConfig(data=1, fsdp=-1),
        # The paper's recipe: AdamW (0.9, 0.95), 3e-4 peak, 2000 warmup, cosine to 10%.
        optim=OptimConfig(lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1, b2=0.95, eps=1e-5),
        data=DataConfig(seq_len=4096),
        train=TrainConfig(steps=500_000, batch_size=1024),
    )
