"""The main job: a small Llama-style model trained on the Python standard library's source.

The corpus is the running interpreter's own standard library, so it needs no download;
a byte-fallback BPE tokenizer is trained on it when the run starts. Sized to train in
about five minutes on two CPU cores and then complete a Python snippet.
"""

from llm_jax.config import DataConfig, DecodeConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="python_stdlib",
        model=ModelConfig(
            vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=256,
            position="rope", norm="rmsnorm", activation="swiglu", tie_embeddings=True,
        ),
        # Small models tolerate a high learning rate; the short run needs it.
        optim=OptimConfig(lr=3e-3, warmup_steps=100, b2=0.99, weight_decay=0.1),
        data=DataConfig(source="stdlib", tokenizer="sentencepiece", tokenizer_model="bpe", seq_len=128,
                        tokenizer_sample_chars=3_000_000),
        # About 2.5M tokens: what two CPU cores get through in five minutes.
        train=TrainConfig(steps=1200, batch_size=16, eval_every=300, eval_steps=10, log_every=50,
                          checkpoint_every=300, run_dir="runs/python_stdlib",
                          sample_prompt="def fibonacci(n):\n", sample_tokens=64),
        # The final sample: a little randomness keeps a small model out of repetition loops.
        decode=DecodeConfig(temperature=0.7, top_p=0.9, seed=0),
    )
