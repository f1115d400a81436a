"""Inference: the jitted decoding loop over an explicit KV cache, and the samplers."""

from llm_jax.inference.generate import Generation, Tokenizer, generate, stream
from llm_jax.inference.sampling import SamplingParams, filter_logits, sample

__all__ = ["Generation", "SamplingParams", "Tokenizer", "filter_logits", "generate", "sample", "stream"]
