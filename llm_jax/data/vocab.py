"""Vocabulary expansion: domain tokens appended to a sentencepiece model, existing ids kept.

The model proto (sentencepiece's own `sentencepiece_model_pb2`) gets one USER_DEFINED
piece per new token, appended after the last piece, so every existing piece keeps its
id and the new tokens get ids `vocab_size, vocab_size + 1, ...`. sentencepiece matches
user-defined pieces before segmenting (longest match), so each new token becomes one id
wherever it occurs, and text without any of them encodes exactly as before.

`add_tokens` also returns how the old model split each token: the pieces whose embedding
rows initialise the new rows (`llm_jax.training.vocab_expansion`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from sentencepiece import sentencepiece_model_pb2

from llm_jax.data.tokenizers import SPACE_MARK, SentencePieceTokenizer


@dataclasses.dataclass(frozen=True)
class Expansion:
    tokenizer: SentencePieceTokenizer
    old_vocab_size: int
    tokens: tuple[str, ...]  # the tokens added, in id order
    splits: tuple[tuple[int, ...], ...]  # each token's ids under the old tokenizer
    skipped: tuple[str, ...]  # tokens already a single piece of the old model


def add_tokens(tokenizer: SentencePieceTokenizer, tokens: Sequence[str]) -> Expansion:
    """`tokenizer` with `tokens` appended as user-defined pieces (see the module docstring)."""
    if not isinstance(tokenizer, SentencePieceTokenizer):
        raise ValueError(f"vocabulary expansion edits sentencepiece models; this run's tokenizer is a "
                         f"{type(tokenizer).__name__} (train with data.tokenizer=sentencepiece)")
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(tokenizer.model_proto)
    existing = {p.piece for p in model.pieces}
    added, splits, skipped = [], [], []
    for token in _checked(tokens):
        piece = token.replace(" ", SPACE_MARK)  # how sentencepiece writes spaces inside pieces
        if piece in existing:
            skipped.append(token)
            continue
        existing.add(piece)
        splits.append(tuple(tokenizer.encode(token)))
        added.append(token)
        model.pieces.add(piece=piece, score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    model.trainer_spec.vocab_size = len(model.pieces)
    new = SentencePieceTokenizer(model.SerializeToString(), source="expanded model")
    for token, new_id in zip(added, range(tokenizer.vocab_size, new.vocab_size)):
        if new.encode(token) != [new_id]:  # sentencepiece's contract, checked rather than assumed
            raise ValueError(f"token {token!r} does not encode as its new id {new_id} but as {new.encode(token)}")
    return Expansion(new, tokenizer.vocab_size, tuple(added), tuple(splits), tuple(skipped))


def _checked(tokens: Sequence[str]) -> list[str]:
    if isinstance(tokens, str):
        raise TypeError("tokens must be a list of strings, not one string")
    out = []
    for token in tokens:
        if not isinstance(token, str) or not token or SPACE_MARK in token or "\n" in token:
            raise ValueError(f"a new token must be a non-empty string without newlines or {SPACE_MARK!r}, got {token!r}")
        if token not in out:
            out.append(token)
    if not out:
        raise ValueError("no tokens to add")
    return out
