"""A tiny Llama-style model for tests, notebooks and checking that things run at all."""

from llm_jax.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="debug",
        model=ModelConfig(
            vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128,
        ),
        optim=OptimConfig(lr=1e-3, warmup_steps=10),
        data=DataConfig(tokenizer="char", seq_len=64),
        train=TrainConfig(steps=50, batch_size=8, eval_every=25, eval_steps=2, log_every=10,
                          checkpoint_every=25, run_dir="runs/debug"),
    )
