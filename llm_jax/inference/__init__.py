"""Inference: the jitted decoding loop over an explicit KV cache, and the samplers."""

from llm_jax.inference.beam_search import BeamSearchResult, beam_search
from llm_jax.inference.generate import Generation, Tokenizer, generate, stream
from llm_jax.inference.sampling import SamplingParams, filter_logits, sample
from llm_jax.inference.speculative import SpeculativeResult, speculative_generate

__all__ = [
    "BeamSearchResult", "Generation", "SamplingParams", "Tokenizer", "beam_search", "filter_logits", "generate",
    "sample", "stream",
]
__all__ += ["SpeculativeResult", "speculative_generate"]
