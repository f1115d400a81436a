"""Fine-tuning a trained model: supervised instruction tuning (SFT), parameter-efficient
tuning (LoRA, QLoRA, prefix / prompt / P-tuning, adapters) and alignment.

The PEFT layers themselves live in `llm_jax.models.peft` (enabled by `model.peft.*`, so a
plain `Transformer(cfg).apply` runs a tuned model); this package holds what training
needs on top: splitting tuned from frozen parameters, their optimizer, checkpoints, data.
"""
