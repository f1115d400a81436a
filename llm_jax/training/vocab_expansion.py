"""Grow a trained model's vocabulary: new embedding rows from the pieces each token replaces.

A new token's input-embedding row (and, for untied models, its output-projection column)
starts as the mean of the rows of the pieces the old tokenizer split it into, a start
close to what the model already computes for that text (Hewitt 2021, "Initializing new
word embeddings"). Every old row is left as it was, and the tokenizer keeps every old id,
so on text without the new tokens the expanded model's logits over the old ids are exactly
the old model's (a test pins this). A model vocabulary padded past the tokenizer's already
has rows for the first new ids; it grows only when the new ids do not fit.

`expand_run` reads a run directory and writes a new one (parameters, the updated config,
the expanded tokenizer) that `llm-jax generate --checkpoint` and `train.init_from` read.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import numpy as np

from llm_jax.data.tokenizers import load_tokenizer
from llm_jax.data.vocab import Expansion, add_tokens
from llm_jax.training.checkpoint import save_model_checkpoint


def grow_embeddings(params: dict, expansion: Expansion) -> dict:
    """`params` with embedding rows (and untied unembedding columns) for the new token ids."""
    embed_VD = np.asarray(params["embed"]["embedding"])
    new_vocab = max(embed_VD.shape[0], expansion.tokenizer.vocab_size)
    first = expansion.old_vocab_size
    params = dict(params)
    params["embed"] = {**params["embed"], "embedding": _with_mean_rows(embed_VD, expansion.splits, first, new_vocab)}
    if "unembed" in params:  # untied: the output projection needs a column per new id too
        kernel_DV = np.asarray(params["unembed"]["kernel"])
        grown_VD = _with_mean_rows(kernel_DV.T, expansion.splits, first, new_vocab)
        params["unembed"] = {**params["unembed"], "kernel": np.ascontiguousarray(grown_VD.T)}
        if "bias" in params["unembed"]:
            bias_V = np.asarray(params["unembed"]["bias"])
            params["unembed"]["bias"] = _with_mean_rows(bias_V[:, None], expansion.splits, first, new_vocab)[:, 0]
    return params


def _with_mean_rows(table_VD: np.ndarray, splits, first: int, new_vocab: int) -> np.ndarray:
    """Rows first.. set to the mean of their split's rows (in f32), padded to `new_vocab` rows."""
    out_VD = np.zeros((new_vocab, table_VD.shape[1]), table_VD.dtype)
    out_VD[:table_VD.shape[0]] = table_VD
    for k, split in enumerate(splits):
        out_VD[first + k] = table_VD[list(split)].astype(np.float32).mean(axis=0).astype(table_VD.dtype)
    return out_VD


def expand_run(run_dir: str | pathlib.Path, tokens: Sequence[str], out_dir: str | pathlib.Path, *,
               step: int | None = None) -> tuple[pathlib.Path, Expansion]:
    """A new run directory: `run_dir`'s model and tokenizer with `tokens` added."""
    import jax

    from llm_jax.training.checkpoint import load_trained_model

    run_dir, out_dir = pathlib.Path(run_dir), pathlib.Path(out_dir).absolute()
    if (out_dir / "checkpoints").exists():
        raise FileExistsError(f"{out_dir} already holds checkpoints; expand into a new directory")
    expansion = add_tokens(load_tokenizer(run_dir / "tokenizer"), tokens)
    cfg, params, step = load_trained_model(run_dir, step=step)
    params = grow_embeddings(jax.tree.map(np.asarray, params), expansion)
    new_vocab = params["embed"]["embedding"].shape[0]
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, vocab_size=new_vocab),
        data=dataclasses.replace(cfg.data, tokenizer_path=str(out_dir / "tokenizer")),
        train=dataclasses.replace(cfg.train, run_dir=str(out_dir)))
    save_model_checkpoint(out_dir, cfg, params, step=step)
    expansion.tokenizer.save(out_dir / "tokenizer")
    return out_dir, expansion


def main_expand_vocab(args) -> int:
    """`llm-jax expand-vocab`."""
    tokens = list(args.token)
    if args.tokens_file:
        path = pathlib.Path(args.tokens_file)
        if not path.is_file():
            raise FileNotFoundError(f"--tokens-file {path} does not exist")
        tokens += [line.rstrip("\r") for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    if not tokens:
        raise ValueError("give the tokens to add with --token TEXT (repeat) or --tokens-file FILE")
    out_dir, expansion = expand_run(args.checkpoint, tokens, args.out, step=args.step)
    for new_id, (token, split) in enumerate(zip(expansion.tokens, expansion.splits), start=expansion.old_vocab_size):
        print(f"{new_id:>7d}  {token!r:30s} was {len(split)} pieces {list(split)}")
    if expansion.skipped:
        print(f"already single pieces, not added: {list(expansion.skipped)}")
    print(f"wrote {out_dir} (vocabulary {expansion.old_vocab_size} -> {expansion.tokenizer.vocab_size})")
    return 0
