"""Tokenizers behind one small interface: sentencepiece (BPE / unigram) and characters.

Both are lossless on the text they cover: `decode(encode(text)) == text`, with newlines,
tabs, runs of spaces and leading/trailing whitespace intact. The sentencepiece models use
byte fallback, so nothing is out of vocabulary: a character the model never learned
becomes its UTF-8 byte pieces. The character tokenizer covers the characters of the text
it was built from; any other character encodes as `unk_id`.

Special ids sit at the bottom of every vocabulary:

    sentencepiece   0 pad, 1 unk, 2 bos, 3 eos, 4 "\\n", 5..260 the bytes <0x00>..<0xFF>,
                    then the learned pieces
    char            0 pad, 1 eos, 2 unk, then the corpus's characters in sorted order

`decode` drops pad/bos/eos and writes U+FFFD for `unk_id` and for any id the tokenizer does
not have (a model's vocabulary is often padded past the tokenizer's, and sampling can pick
one of those rows): visible, never silently dropped.

A saved tokenizer is a directory holding `tokenizer.json` (its kind and ids) and, for
sentencepiece, `tokenizer.model`; `load_tokenizer(directory)` reads either kind back.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import random
import re
from typing import Iterable, Literal, Protocol, Sequence

import sentencepiece as spm

META_FILE = "tokenizer.json"
SENTENCEPIECE_MODEL_FILE = "tokenizer.model"
KINDS = ("sentencepiece", "char")  # trainable here
LOADABLE_KINDS = KINDS + ("hf",)  # "hf": imported from Hugging Face (llm_jax.interop)
MODEL_TYPES = ("bpe", "unigram")
REPLACEMENT = "\ufffd"  # what unknown and foreign ids decode to


class Tokenizer(Protocol):
    """What the data pipeline, training loop and generation need from a tokenizer.

    `token_bytes(i)` is the number of UTF-8 bytes of text id `i` stands for (0 for the
    specials); evaluation uses it to report bits per byte.
    """

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
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return directory


# ---------------------------------------------------------------------------- characters


class CharTokenizer:
    """One id per character (nanoGPT's shakespeare_char).

    A character outside the vocabulary encodes as `unk_id` and decodes as U+FFFD, so text
    with unseen characters does not round-trip; build the vocabulary from all the text.
    """

    pad_id, eos_id, unk_id = 0, 1, 2
    bos_id = None
    n_specials = 3

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad or len(set(chars)) != len(chars):
            raise ValueError(f"chars must be distinct single characters; got bad entries {bad[:5]} "
                             f"and {len(chars) - len(set(chars))} duplicates")
        self.chars = chars
        self._ids = {c: i + self.n_specials for i, c in enumerate(chars)}
        self.vocab_size = len(chars) + self.n_specials

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The vocabulary is the sorted set of the characters of `text`."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError("cannot build a character vocabulary from empty text")
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, self.unk_id) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in map(int, ids):
            if self.n_specials <= i < self.vocab_size:
                out.append(self.chars[i - self.n_specials])
            elif i not in (self.pad_id, self.eos_id):
                out.append(REPLACEMENT)
        return "".join(out)

    def token_bytes(self, token_id: int) -> int:
        i = int(token_id)
        return len(self.chars[i - self.n_specials].encode()) if self.n_specials <= i < self.vocab_size else 0

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        return _write_meta(directory, {"kind": "char", "vocab_size": self.vocab_size, "pad_id": self.pad_id,
                                       "eos_id": self.eos_id, "unk_id": self.unk_id, "chars": self.chars})


# ------------------------------------------------------------------------- sentencepiece


# 4 specials, "\n", 256 byte pieces and at least one learned piece. Most texts need more:
# sentencepiece also wants a piece for each common character (see _train_error).
MIN_SENTENCEPIECE_VOCAB = 4 + 1 + 256 + 1
# Lines longer than this are skipped in training (minified code, data blobs): they cost
# time and teach nothing reusable. Encoding handles any length.
MAX_TRAINING_LINE_CHARS = 4096
# A fixed thread count, not os.cpu_count(): unigram training's result depends on it, and
# the same texts must give the same model on every machine.
TRAINING_THREADS = 2
SPACE_MARK = "\u2581"  # sentencepiece's stand-in for " "


def _training_lines(texts: Iterable[str], max_chars: int, max_lines: int, seed: int) -> list[str]:
    """The lines sentencepiece learns from: `texts` cut at newlines, capped, seeded sample.

    sentencepiece trains on "sentences" and cannot hold "\\n" inside a learned piece, so
    each document is cut into its lines and the newline becomes a user-defined piece of its
    own (always one id, never merged). A line keeps its leading indentation and trailing
    spaces, so runs like 4 or 8 spaces are learned as single pieces. Blank lines teach
    nothing; texts are read only until `max_chars`, so a huge corpus iterator is not drained.
    """
    if isinstance(texts, str):  # one document, not an iterable of one-character documents
        texts = [texts]
    lines, total = [], 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip() or len(line) > MAX_TRAINING_LINE_CHARS:
                continue
            lines.append(line)
            total += len(line) + 1
            if total >= max_chars:
                break
        if total >= max_chars:
            break
    if len(lines) > max_lines:  # ours, not sentencepiece's sampler, which ignores the seed
        keep = sorted(random.Random(seed).sample(range(len(lines)), max_lines))
        lines = [lines[i] for i in keep]
    return lines


def _check_training_args(vocab_size: int, model_type: str, max_chars: int, max_lines: int) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not a sentencepiece model type; choose one of {MODEL_TYPES}")
    if not isinstance(vocab_size, int) or vocab_size < MIN_SENTENCEPIECE_VOCAB:
        raise ValueError(f"vocab_size={vocab_size!r} is too small for sentencepiece with byte fallback: it needs at "
                         f"least {MIN_SENTENCEPIECE_VOCAB} (4 specials, newline, 256 bytes, one learned piece)")
    if max_chars <= 0 or max_lines <= 0:
        raise ValueError(f"max_chars={max_chars} and max_lines={max_lines} must both be positive")


def _train_error(error: RuntimeError, vocab_size: int) -> ValueError:
    """sentencepiece's training failures, said in terms of our arguments."""
    found = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(error))
    if found:
        return ValueError(f"vocab_size={vocab_size} is too small for this text: the specials, bytes and the text's "
                          f"common characters already need {found.group(2)} ids; use vocab_size >= "
                          f"{int(found.group(2)) + 1} (a few thousand for real corpora)")
    return ValueError(f"sentencepiece could not train with vocab_size={vocab_size}: {error}")


class SentencePieceTokenizer:
    """A sentencepiece model with byte fallback and identity normalization (lossless)."""

    def __init__(self, model_proto: bytes, source: str = "model_proto"):
        try:
            self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise ValueError(f"{source} is not a sentencepiece model: {e}") from None
        p = self.processor
        if p.pad_id() < 0 or p.eos_id() < 0:
            raise ValueError(f"{source} has pad_id={p.pad_id()}, eos_id={p.eos_id()}; both must be set "
                             "(train it with SentencePieceTokenizer.train, or pass pad_id/eos_id to sentencepiece)")
        self.model_proto = model_proto
        self.vocab_size = p.get_piece_size()
        self.pad_id, self.unk_id, self.eos_id = p.pad_id(), p.unk_id(), p.eos_id()
        self.bos_id = p.bos_id() if p.bos_id() >= 0 else None
        mark = [p.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]
        self._mark_ids = mark if all(p.is_byte(i) for i in mark) else None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: Literal["bpe", "unigram"] = "bpe", *,
              max_chars: int = 20_000_000, max_lines: int = 1_000_000, seed: int = 0) -> "SentencePieceTokenizer":
        """Train in memory on the first `max_chars` characters of `texts` (a str is one text).

        `vocab_size` is an upper bound: on little text sentencepiece stops when it runs out
        of pieces worth adding. When more than `max_lines` lines arrive, a `seed`ed sample of
        them is used. Same texts and seed give the same model. On 2 cores and 5 M characters
        of Python, BPE trains in about 1 s and unigram in about 15 s (its EM passes).
        """
        _check_training_args(vocab_size, model_type, max_chars, max_lines)
        lines = _training_lines(texts, max_chars, max_lines, seed)
        if not lines:
            raise ValueError(f"no text to train a tokenizer on: texts are empty, blank, or only lines longer than "
                             f"{MAX_TRAINING_LINE_CHARS} characters")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
                pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=["\n"], unk_surface=REPLACEMENT,
                byte_fallback=True, character_coverage=0.9995,
                # Lossless: no NFKC, every space kept, no invented leading space; whitespace
                # runs (indentation) may be pieces of their own.
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
                allow_whitespace_only_pieces=True, split_digits=True,
                # Little text is not an error: sentencepiece stops short of vocab_size.
                hard_vocab_limit=False,
                # Lines were capped and sampled above; sentencepiece takes them all, as given.
                input_sentence_size=0, shuffle_input_sentence=False,
                max_sentence_length=4 * MAX_TRAINING_LINE_CHARS,  # bytes; no line is dropped here
                num_threads=TRAINING_THREADS, minloglevel=2,  # 2: errors only, no progress spam
            )
        except RuntimeError as e:
            raise _train_error(e, vocab_size) from None
        return cls(model.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        """Read a sentencepiece `.model` file."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no sentencepiece model file at {path}")
        return cls(path.read_bytes(), source=str(path))

    def encode(self, text: str) -> list[int]:
        if self._mark_ids is None or SPACE_MARK not in text:
            return self.processor.encode(text)
        # sentencepiece writes " " as U+2581 and decodes every U+2581 as " ", so a literal
        # U+2581 in the text goes in as its three byte pieces, which decode to it verbatim.
        ids = []
        for k, part in enumerate(text.split(SPACE_MARK)):
            if k:
                ids += self._mark_ids
            ids += self.processor.encode(part)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        n = self.vocab_size
        return self.processor.decode([i if 0 <= i < n else self.unk_id for i in map(int, ids)])

    def token_bytes(self, token_id: int) -> int:
        p, i = self.processor, int(token_id)
        if not 0 <= i < self.vocab_size or p.is_control(i) or p.is_unknown(i):
            return 0
        if p.is_byte(i):
            return 1
        return len(p.id_to_piece(i).replace(SPACE_MARK, " ").encode())

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        directory = _write_meta(directory, {
            "kind": "sentencepiece", "model": SENTENCEPIECE_MODEL_FILE, "vocab_size": self.vocab_size,
            "pad_id": self.pad_id, "unk_id": self.unk_id, "bos_id": self.bos_id, "eos_id": self.eos_id})
        (directory / SENTENCEPIECE_MODEL_FILE).write_bytes(self.model_proto)
        return directory


# ---------------------------------------------------------------------------- the factory


def train_tokenizer(kind: Literal["sentencepiece", "char"], texts: Iterable[str], vocab_size: int,
                    model_type: Literal["bpe", "unigram"] = "bpe") -> Tokenizer:
    """Train a tokenizer of `kind` on `texts` with at most `vocab_size` ids.

    `model_type` picks the sentencepiece algorithm; the char tokenizer has none and ignores it.
    """
    if kind == "sentencepiece":
        return SentencePieceTokenizer.train(texts, vocab_size, model_type)
    if kind == "char":
        tokenizer = CharTokenizer.from_text(texts if isinstance(texts, str) else "".join(texts))
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"the text has {len(tokenizer.chars)} distinct characters, {tokenizer.vocab_size} ids "
                             f"with the specials, more than vocab_size={vocab_size} (raise model.vocab_size)")
        return tokenizer
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {KINDS}")


def _read_meta(directory: pathlib.Path) -> tuple[pathlib.Path, dict]:
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        hint = " (it is a file; load a .model with SentencePieceTokenizer.load)" if directory.is_file() else ""
        raise FileNotFoundError(f"no saved tokenizer at {directory}{hint}: {META_FILE} is missing; "
                                "write one with tokenizer.save(directory)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} must hold a JSON object, got {type(meta).__name__}")
    return meta_path, meta


def _check_ids(tokenizer: Tokenizer, meta: dict, meta_path: pathlib.Path) -> Tokenizer:
    """The files must agree: a model file swapped under its tokenizer.json is an error."""
    for key in ("vocab_size", "pad_id", "eos_id", "bos_id", "unk_id"):
        if key in meta and meta[key] != getattr(tokenizer, key):
            raise ValueError(f"{meta_path} says {key}={meta[key]!r} but the loaded tokenizer has "
                             f"{getattr(tokenizer, key)!r}; the saved files do not belong together")
    return tokenizer


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Read a tokenizer written by `save(directory)`."""
    meta_path, meta = _read_meta(pathlib.Path(directory))
    kind = meta.get("kind")
    if kind == "char":
        if not isinstance(meta.get("chars"), list):
            raise ValueError(f"{meta_path} has kind 'char' but no 'chars' list")
        return _check_ids(CharTokenizer(meta["chars"]), meta, meta_path)
    if kind == "sentencepiece":
        model = meta_path.parent / meta.get("model", SENTENCEPIECE_MODEL_FILE)
        return _check_ids(SentencePieceTokenizer.load(model), meta, meta_path)
    if kind == "hf":  # needs the hf extra
        from llm_jax.interop.tokenizer import HFTokenizer

        return HFTokenizer.load(meta_path.parent)
    raise ValueError(f"{meta_path} names an unknown tokenizer kind {kind!r}; known kinds: {LOADABLE_KINDS}")
