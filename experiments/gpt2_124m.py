"""GPT-2 small (124M): 12 layers, 12 heads, d_model 768, context 1024."""

from llm_jax.config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig
from llm_jax.models.presets import gpt2

# Parameters in the released checkpoint (tied embeddings counted once).
PUBLISHED_PARAMS = 124_439_808


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="gpt2_124m",
        model=gpt2(d_model=768, n_layers=12, n_heads=12),
        # nanoGPT's OpenWebText recipe: 6e-4 peak, 2000 warmup steps, decay to 6e-5.
        optim=OptimConfig(lr=6e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1, b2=0.95),
        data=DataConfig(seq_len=1024),
        train=TrainConfig(steps=600_000, batch_size=480, microbatches=40),
    )
