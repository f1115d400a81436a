"""Tokenizers behind one small interface: sentencepiece (BPE / unigram) and characters.

Both are lossless on the text they cover: `decode(encode(text)) == text`, whitespace,
newlines and indentation included. The sentencepiece models use byte fallback, so no
input is ever out of vocabulary: a character the model never saw becomes its UTF-8 bytes.

Special ids sit at the bottom of every vocabulary:

    sentencepiece   0 pad, 1 unk, 2 bos, 3 eos, then 256 byte pieces, "\\n", learned pieces
    char            0 pad, 1 eos, 2 unk, then the corpus's characters in sorted order

A saved tokenizer is a directory with `tokenizer.json` (its kind and ids) and, for
sentencepiece, `tokenizer.model`; `load_tokenizer(directory)` reads either kind back.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import pathlib
from typing import Iterable, Literal, Protocol, Sequence

import sentencepiece as spm

META_FILE = "tokenizer.json"
KINDS = ("sentencepiece", "char")


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self, token_id: int) -> int: ...

    def save(self, directory: str | os.PathLike) -> pathlib.Path: ...


def _write_meta(directory: str | os.PathLike, meta: dict) -> pathlib.Path:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    return directory


# ---------------------------------------------------------------------------- characters


class CharTokenizer:
    """One id per character; an unseen character encodes as `unk_id` (and decodes as U+FFFD)."""

    pad_id, eos_id, unk_id = 0, 1, 2
    bos_id = None
    _SPECIALS = 3

    def __init__(self, chars: Sequence[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("a character vocabulary must hold distinct single characters")
        self.chars = list(chars)
        self._ids = {c: i + self._SPECIALS for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars) + self._SPECIALS

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        if not text:
            raise ValueError("cannot build a character vocabulary from empty text")
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, self.unk_id) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.unk_id:
                out.append("\ufffd")
            elif self._SPECIALS <= i < self.vocab_size:
                out.append(self.chars[i - self._SPECIALS])
        return "".join(out)

    def token_bytes(self, token_id: int) -> int:
        token_id = int(token_id)
        return len(self.chars[token_id - self._SPECIALS].encode()) if token_id >= self._SPECIALS else 0

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        return _write_meta(directory, {"kind": "char", "chars": self.chars, "pad_id": self.pad_id,
                                       "eos_id": self.eos_id, "unk_id": self.unk_id})


# ------------------------------------------------------------------------- sentencepiece


# The smallest vocabulary that holds the specials, the 256 byte pieces and "\n".
MIN_SENTENCEPIECE_VOCAB = 4 + 256 + 1 + 1


def _training_lines(texts: Iterable[str], max_chars: int, max_line_bytes: int) -> Iterable[str]:
    """Lines of the training texts (sentencepiece learns from "sentences"), capped in total.

    A newline never reaches the trainer: it is a piece of its own ("\\n" is a user-defined
    symbol), so pieces stay within a line and indentation runs become pieces.
    """
    total = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip() or len(line.encode()) > max_line_bytes:
                continue
            total += len(line) + 1
            yield line
            if total >= max_chars:
                return


class SentencePieceTokenizer:
    """A sentencepiece model with byte fallback and identity normalization (lossless)."""

    def __init__(self, model_proto: bytes):
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.model_proto = model_proto
        self.vocab_size = self.processor.get_piece_size()
        self.pad_id, self.unk_id = self.processor.pad_id(), self.processor.unk_id()
        self.bos_id, self.eos_id = self.processor.bos_id(), self.processor.eos_id()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: Literal["bpe", "unigram"] = "bpe", *,
              max_chars: int = 20_000_000) -> "SentencePieceTokenizer":
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"sentencepiece model_type must be 'bpe' or 'unigram', got {model_type!r}")
        if vocab_size < MIN_SENTENCEPIECE_VOCAB:
            raise ValueError(f"vocab_size={vocab_size} is too small for sentencepiece with byte fallback: it needs "
                             f"at least {MIN_SENTENCEPIECE_VOCAB} (4 specials, 256 bytes, newline, one piece)")
        max_line_bytes = 8192
        first, lines = _peek(_training_lines(texts, max_chars, max_line_bytes))
        if first is None:
            raise ValueError("cannot train a tokenizer on empty text")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, character_coverage=0.9995,
            # Lossless: no NFKC, keep every space, no invented leading space.
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=["\n"],
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, max_sentence_length=max_line_bytes,
            # Too small a vocabulary for the text is not an error: sentencepiece stops short.
            hard_vocab_limit=False, num_threads=min(4, os.cpu_count() or 1),
            shuffle_input_sentence=False, minloglevel=2,  # in order: the same texts give the same model
        )
        return cls(model.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no sentencepiece model at {path}")
        return cls(path.read_bytes())

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode([int(i) for i in ids])

    def token_bytes(self, token_id: int) -> int:
        p, token_id = self.processor, int(token_id)
        if p.is_byte(token_id):
            return 1
        if p.is_control(token_id) or p.is_unknown(token_id):
            return 0
        return len(p.id_to_piece(token_id).replace("\u2581", " ").encode())

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        directory = _write_meta(directory, {"kind": "sentencepiece", "model": "tokenizer.model",
                                            "vocab_size": self.vocab_size, "pad_id": self.pad_id,
                                            "eos_id": self.eos_id, "bos_id": self.bos_id})
        (directory / "tokenizer.model").write_bytes(self.model_proto)
        return directory


def _peek(iterator):
    iterator = iter(iterator)
    first = next(iterator, None)
    return first, (iterator if first is None else itertools.chain([first], iterator))


# ---------------------------------------------------------------------------- the factory


def train_tokenizer(kind: Literal["sentencepiece", "char"], texts: Iterable[str], vocab_size: int,
                    model_type: Literal["bpe", "unigram"] = "bpe") -> Tokenizer:
    """Train a tokenizer of `kind` on `texts`; a char vocabulary must fit in `vocab_size`."""
    if kind == "sentencepiece":
        return SentencePieceTokenizer.train(texts, vocab_size, model_type)
    if kind == "char":
        tokenizer = CharTokenizer.from_text("".join(texts))
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"the text has {len(tokenizer.chars)} distinct characters, {tokenizer.vocab_size} ids "
                             f"with the specials, more than vocab_size={vocab_size} (raise model.vocab_size)")
        return tokenizer
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {KINDS}")


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Read a tokenizer saved with `save(directory)`."""
    meta_path = pathlib.Path(directory) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no saved tokenizer in {directory}: {META_FILE} is missing")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    kind = meta.get("kind")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "sentencepiece":
        return SentencePieceTokenizer.load(meta_path.parent / meta.get("model", "tokenizer.model"))
    raise ValueError(f"{meta_path} names an unknown tokenizer kind {kind!r}; known kinds: {KINDS}")
