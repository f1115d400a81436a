"""Inference: the jitted decoding loop over an explicit KV cache, samplers, beam search,
speculative decoding and weight-only quantization (`llm_jax.inference.quantize`)."""

from llm_jax.inference.beam_search import BeamSearchResult, beam_search
from llm_jax.inference.generate import Generation, Tokenizer, generate, prepare_decoding_weights, stream
from llm_jax.inference.sampling import SamplingParams, filter_logits, sample
from llm_jax.inference.speculative import SpeculativeResult, speculative_generate

__all__ = [
    "BeamSearchResult",
    "Generation",
    "SamplingParams",
    "SpeculativeResult",
    "Tokenizer",
    "beam_search",
    "filter_logits",
    "generate",
    "prepare_decoding_weights",
    "sample",
    "speculative_generate",
    "stream",
]
