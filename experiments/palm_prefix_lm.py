"""A small PaLM-style prefix LM: parallel blocks, multi-query attention, SwiGLU, RoPE.

The prefix (e.g. a prompt or an input document) is attended bidirectionally and the
rest causally, as in PaLM's and GLM's prefix-LM objective.
"""

from llm_jax.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> ExperimentConfig:
    model = ModelConfig(
        vocab_size=32000,
        d_model=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=1,  # multi-query attention, as in PaLM
        d_ff=4 * 512,
        max_seq_len=1024,
        mask="prefix",
        position="rope",
        norm="layernorm",
        activation="swiglu",
        parallel_block=True,
        tie_embeddings=True,
        use_bias=False,
    )
    return ExperimentConfig(
        name="palm_prefix_lm",
        model=model,
        # PaLM trains with Adafactor (no factored second moment) and no weight decay beyond lr^2.
        optim=OptimConfig(name="adafactor", lr=1e-2, warmup_steps=1000, weight_decay=0.0),
        data=DataConfig(seq_len=512),
        train=TrainConfig(steps=20_000, batch_size=64),
    )
