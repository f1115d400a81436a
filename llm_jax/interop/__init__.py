"""Hugging Face interoperability: checkpoints (safetensors) and tokenizers, both ways.

    from llm_jax.interop import load_hf_checkpoint, save_hf_checkpoint, load_hf_tokenizer

    cfg, params = load_hf_checkpoint("Llama-3.2-1B/", mesh)     # streamed into its shardings
    save_hf_checkpoint(params, cfg, "out/", tokenizer=load_hf_tokenizer("Llama-3.2-1B/"))
    convert_from_hf("Llama-3.2-1B/", "runs/llama")             # an llm_jax run directory
    convert_to_hf("runs/llama", "out/")

Supported model types, one table each in `families.py`: llama (Llama 2 / 3, with Llama
3.1 RoPE scaling), mistral (sliding window), qwen2 (q/k/v biases), gpt2. Only
safetensors are read: unpickling a `.bin` checkpoint can execute code.

Names resolve on first use, so that `llm_jax.interop.cli` (what the `llm-jax` parser
imports) costs no JAX import and does not need the hf extra.
"""

import importlib

_WHERE = {
    "load_hf_checkpoint": "convert",
    "save_hf_checkpoint": "convert",
    "convert_from_hf": "convert",
    "convert_to_hf": "convert",
    "write_run_dir": "convert",
    "FAMILIES": "families",
    "InteropError": "hf_config",
    "to_model_config": "hf_config",
    "to_hf_config": "hf_config",
    "HFTokenizer": "tokenizer",
    "load_hf_tokenizer": "tokenizer",
    "add_convert_args": "cli",
    "main_convert": "cli",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'llm_jax.interop' has no attribute {name!r}")
    return getattr(importlib.import_module(f"llm_jax.interop.{_WHERE[name]}"), name)
