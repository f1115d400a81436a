"""The grain input pipeline: documents -> token ids -> packed rows -> batches.

Every document is tokenized and closed with an end-of-sequence id; the stream of
documents is concatenated and cut into rows of `seq_len + 1` tokens (grain's
`ConcatThenSplitIterDataset`), so no token is padding and none is dropped. A row keeps
per-token segment ids and positions (restarting at 0 for every document piece), which
the model uses to stop packed documents from attending to each other; the loss skips
the one target per boundary that would predict a new document from the previous one.

Training streams repeat forever and reshuffle the documents every epoch; validation
streams run once, in order. Each JAX process reads its own slice of the documents.
The iterator's `get_state()` / `set_state()` (stored in checkpoints) resume on exactly
the next batch.
"""

from __future__ import annotations

import os
import pathlib
import random
from typing import Iterator

import grain
import grain.experimental
import numpy as np

from llm_jax.config import ConfigError, DataConfig
from llm_jax.data import corpora
from llm_jax.data.corpora import Corpus, Documents
from llm_jax.data.tokenizers import Tokenizer, load_tokenizer, train_tokenizer


def packed_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Turn one packed row of `seq_len + 1` tokens into model inputs and targets."""
    tokens, segments, positions = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
    # A target counts only if it continues the same document as its input (segment 0 is
    # the padding of a final, partial row).
    same_document = (segments[1:] == segments[:-1]) & (segments[:-1] > 0)
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": segments[:-1],
        "positions": positions[:-1],
        "loss_mask": same_document.astype(np.int32),
    }


class _Tokenize:
    """Picklable (for grain worker processes) document -> {"tokens": ids + [eos]}."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
        return {"tokens": np.asarray(ids, np.int32)}


def packed_batches(
    documents: Documents,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    train: bool,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Batches of packed rows: dicts of int32 [batch_size, seq_len] arrays.

    `train=True`: documents shuffled with `seed`, reshuffled each epoch, repeated
    forever. `train=False`: one pass in order; a last partial batch is dropped.
    """
    if len(documents) == 0:
        raise ValueError("the corpus split has no documents: nothing to train or evaluate on")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    ds = grain.MapDataset.source(documents)
    if train:
        ds = ds.shuffle(seed=seed)
    ds = ds[process_index::process_count]
    if train:
        ds = ds.repeat(None)  # reseeds the shuffle every epoch
    rows = grain.experimental.ConcatThenSplitIterDataset(
        ds.map(_Tokenize(tokenizer)).to_iter_dataset(),
        length_struct={"tokens": seq_len + 1},
    )
    return rows.map(packed_row).batch(batch_size, drop_remainder=True)


def first_batches(dataset: grain.IterDataset, n: int) -> Iterator[dict[str, np.ndarray]]:
    """At most `n` batches from the start of a (validation) stream."""
    iterator = iter(dataset)
    for _ in range(n):
        try:
            yield next(iterator)
        except StopIteration:
            return


def default_data_dir() -> pathlib.Path:
    """Where prepared corpora live unless `data.data_dir` says otherwise."""
    return pathlib.Path(os.environ.get("LLM_JAX_DATA_DIR", pathlib.Path.home() / ".cache" / "llm_jax" / "datasets"))


def open_corpus(cfg: DataConfig) -> Corpus:
    """The train / validation documents that `cfg` names, prepared on first use."""
    data_dir = pathlib.Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    if cfg.source == "stdlib":
        return corpora.stdlib_corpus(data_dir, validation_fraction=cfg.validation_fraction, split=cfg.split)
    if cfg.source == "text":
        if cfg.path is None:
            raise ConfigError("data.source=text needs data.path=FILE_OR_DIRECTORY")
        return corpora.prepare_text_corpus(cfg.path, data_dir, split=cfg.split,
                                           validation_fraction=cfg.validation_fraction)
    if cfg.tfds_name is None:
        raise ConfigError("data.source=tfds needs data.tfds_name=NAME (a dataset prepared in data.data_dir)")
    return corpora.load_tfds_corpus(cfg.tfds_name, data_dir, text_field=cfg.text_field)


def sample_text(documents: Documents, max_chars: int, seed: int = 0) -> Iterator[str]:
    """Documents in a seeded random order until about `max_chars` characters are out."""
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    total = 0
    for i in order:
        if total >= max_chars:
            return
        text = documents[i]
        total += len(text)
        yield text


def make_tokenizer(cfg: DataConfig, corpus: Corpus, vocab_size: int) -> Tokenizer:
    """Load `cfg.tokenizer_path`, or train the configured tokenizer on the training split."""
    if cfg.tokenizer_path:
        return load_tokenizer(cfg.tokenizer_path)
    texts = sample_text(corpus.train, cfg.tokenizer_sample_chars)
    return train_tokenizer(cfg.tokenizer, texts, vocab_size, model_type=cfg.tokenizer_model)
