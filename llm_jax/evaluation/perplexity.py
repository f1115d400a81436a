"""Perplexity and bits per byte on a fixed set of packed validation batches.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes the scored target
tokens stand for, so models with different tokenizers can be compared; perplexity is
per token of this model's tokenizer.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.data.corpora import Documents
from llm_jax.data.pipeline import first_batches, packed_batches
from llm_jax.data.tokenizers import Tokenizer
from llm_jax.training.step import eval_step

Batch = dict[str, np.ndarray]


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special and unused ids)."""
    lengths = np.zeros(vocab_size, np.int64)
    for i in range(tokenizer.vocab_size):
        lengths[i] = tokenizer.token_bytes(i)
    return lengths


def validation_batches(documents: Documents, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, n_batches: int,
                       vocab_size: int, process_index: int = 0, process_count: int = 1) -> tuple[list[Batch], int]:
    """The first `n_batches` packed batches of a split, and the bytes their scored targets cover."""
    stream = packed_batches(documents, tokenizer, seq_len=seq_len, batch_size=batch_size, train=False,
                            process_index=process_index, process_count=process_count)
    batches = list(first_batches(stream, n_batches))
    lengths = token_byte_lengths(tokenizer, vocab_size)
    n_bytes = sum(int((lengths[b["targets"]] * b["loss_mask"]).sum()) for b in batches)
    return batches, n_bytes


def evaluate_perplexity(params, model_cfg: ModelConfig, batches: Sequence[Batch], n_bytes: int,
                        put: Callable[[Batch], dict] = lambda b: b) -> dict[str, float]:
    """Mean loss per scored token, its perplexity, and bits per byte over `batches`."""
    sums = [eval_step(params, put(b), model_cfg=model_cfg) for b in batches]
    sums = jax.device_get(sums)
    loss_sum = float(sum(s["loss_sum"] for s in sums))
    tokens = float(sum(s["tokens"] for s in sums))
    loss = loss_sum / max(tokens, 1.0)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": loss_sum / math.log(2) / max(n_bytes, 1),
    }


def quantization_report(params, model_cfg: ModelConfig, batches: Sequence[Batch], n_bytes: int,
                        schemes: Sequence[tuple[int, int | None]] = ((8, None), (4, 128))) -> list[dict]:
    """Perplexity of the float weights and of each (bits, group_size) weight-only quantization.

    Each quantized model is evaluated through the same eval step after dequantizing, which
    computes exactly what the decoding loop computes from the quantized weights.
    """
    from llm_jax.inference.quantize import dequantize_params, params_nbytes, quantize_params

    reference = evaluate_perplexity(params, model_cfg, batches, n_bytes)
    rows = [{"weights": "float32", "bytes": params_nbytes(params), **reference, "perplexity_change": 0.0}]
    for bits, group_size in schemes:
        quantized = quantize_params(params, model_cfg, bits=bits, group_size=group_size)
        result = evaluate_perplexity(dequantize_params(quantized), model_cfg, batches, n_bytes)
        name = f"int{bits}" + (f" (groups of {group_size})" if group_size else " (per channel)")
        rows.append({"weights": name, "bytes": params_nbytes(quantized), **result,
                     "perplexity_change": result["perplexity"] / reference["perplexity"] - 1.0})
    return rows
