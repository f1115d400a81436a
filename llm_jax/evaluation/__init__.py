"""Evaluation: perplexity and bits per byte (more metrics arrive with the evaluation issue)."""

from llm_jax.evaluation.perplexity import evaluate_perplexity, quantization_report, validation_batches

__all__ = ["evaluate_perplexity", "quantization_report", "validation_batches"]
