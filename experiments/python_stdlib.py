"""The main job: a small Llama-style model trained on the Python standard library's source.

The corpus is the running interpreter's own standard library, so it needs no download;
a byte-fallback BPE tokenizer is trained on it when the run starts. Sized to train in
about five minutes on two CPU cores and then complete a Python snippet.
"""

from llm_jax.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="python_stdlib",
        model=ModelConfig(
            vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=704, max_seq_len=256,
            position="rope", norm="rmsnorm", activation="swiglu", tie_embeddings=True,
        ),
        # Small models tolerate a high learning rate; the short run needs it.
        optim=OptimConfig(lr=2e-3, warmup_steps=50, b2=0.99, weight_decay=0.1),
        data=DataConfig(source="stdlib", tokenizer="sentencepiece", tokenizer_model="bpe", seq_len=128,
                        tokenizer_sample_chars=3_000_000),
        train=TrainConfig(steps=600, batch_size=16, eval_every=200, eval_steps=10, log_every=25,
                          checkpoint_every=200, run_dir="runs/python_stdlib",
                          sample_prompt="def fibonacci(n):\n", sample_tokens=64),
    )
