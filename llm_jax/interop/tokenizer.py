"""A Hugging Face tokenizer behind llm_jax's `Tokenizer` protocol.

It reads `tokenizer.json` with the `tokenizers` library (what transformers' fast
tokenizers run), or, when a checkpoint ships only a sentencepiece `tokenizer.model`
(older Llama 2 repositories), that model with sentencepiece. Special tokens come from
`tokenizer_config.json` / `special_tokens_map.json`, else config.json's ids.

`encode` adds no special tokens by default, like the other tokenizers here (callers
prepend `bos_id` where a model wants it, and stop strings then encode to their own
text); `add_special_tokens=True` encodes exactly as transformers' `tokenizer(text)` does.

Saved into a run directory, the original files are kept verbatim under `hf/`, beside
our own `tokenizer.json` meta of kind "hf" (their file of that name would clash with it).
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Sequence

import numpy as np
import sentencepiece as spm

from llm_jax.interop.hf_config import InteropError

KIND = "hf"
META_FILE = "tokenizer.json"  # our meta, as llm_jax.data.tokenizers writes it
FILES_DIR = "hf"
# What a Hugging Face checkpoint keeps its tokenizer in (the first two are read, the rest kept).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # sentencepiece byte fallback


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(files: dict[str, bytes]) -> dict[str, str]:
    tokens = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        if name in files:
            config = json.loads(files[name])
            for kind in ("bos", "eos", "pad", "unk"):
                content = _token_content(config.get(f"{kind}_token"))
                if content is not None:
                    tokens[kind] = content
    return tokens


def _first(ids) -> int | None:
    """config.json may list several eos ids (Llama 3 instruct); the first is the eos."""
    if isinstance(ids, list):
        return ids[0] if ids else None
    return ids


class HFTokenizer:
    """A Hugging Face tokenizer (tokenizer.json or sentencepiece tokenizer.model)."""

    def __init__(self, files: dict[str, bytes], *, fallback_ids: dict | None = None,
                 add_special_tokens: bool = False):
        self.files = dict(files)
        self.add_special_tokens = add_special_tokens
        if "tokenizer.json" in files:
            import tokenizers

            self._fast = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
            self._sp = None
            self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
        elif "tokenizer.model" in files:
            self._fast = None
            self._sp = spm.SentencePieceProcessor(model_proto=files["tokenizer.model"])
            self.vocab_size = self._sp.get_piece_size()
        else:
            raise InteropError(f"no tokenizer.json or tokenizer.model among the tokenizer files {sorted(files)}")
        ids = self._special_ids(fallback_ids or {})
        if ids.get("eos") is None:
            raise InteropError("the tokenizer names no eos token (tokenizer_config.json eos_token, or "
                               "config.json eos_token_id); llm_jax needs one to end documents")
        self.eos_id, self.bos_id = ids["eos"], ids.get("bos")
        self.pad_id = ids["eos"] if ids.get("pad") is None else ids["pad"]  # no pad token: eos pads
        self._byte_lengths: np.ndarray | None = None

    def _special_ids(self, fallback: dict) -> dict:
        ids = {k: self._token_id(t) for k, t in _special_tokens(self.files).items()}
        if self._sp is not None:
            sp_ids = {"bos": self._sp.bos_id(), "eos": self._sp.eos_id(), "pad": self._sp.pad_id()}
            ids = {**{k: v for k, v in sp_ids.items() if v >= 0}, **ids}
        for kind, value in fallback.items():
            if ids.get(kind) is None and value is not None:
                ids[kind] = value
        return ids

    def _token_id(self, token: str) -> int | None:
        if self._fast is not None:
            return self._fast.token_to_id(token)
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    # -------------------------------------------------------------------- the protocol

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=self.add_special_tokens).ids
        ids = self._sp.encode(text)
        return [self.bos_id] + ids if self.add_special_tokens and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=True)
        return self._sp.decode(ids)

    def token_bytes(self, token_id: int) -> int:
        """UTF-8 bytes of text the token stands for (0 for special tokens)."""
        if self._byte_lengths is None:
            self._byte_lengths = self._fast_byte_lengths() if self._fast is not None else self._sp_byte_lengths()
        token_id = int(token_id)
        return int(self._byte_lengths[token_id]) if 0 <= token_id < len(self._byte_lengths) else 0

    def _fast_byte_lengths(self) -> np.ndarray:
        from tokenizers.pre_tokenizers import ByteLevel

        byte_level = '"ByteLevel"' in json.dumps(json.loads(self.files["tokenizer.json"]).get("decoder"))
        alphabet = set(ByteLevel.alphabet())
        lengths = np.zeros(self.vocab_size, np.int64)
        for token, i in self._fast.get_vocab(with_added_tokens=False).items():
            if byte_level and set(token) <= alphabet:
                lengths[i] = len(token)  # each character stands for one byte
            elif _BYTE_PIECE.fullmatch(token):
                lengths[i] = 1
            else:
                lengths[i] = len(token.replace("\u2581", " ").encode())
        for i, added in self._fast.get_added_tokens_decoder().items():
            lengths[i] = 0 if added.special else len(added.content.encode())
        return lengths

    def _sp_byte_lengths(self) -> np.ndarray:
        sp = self._sp
        lengths = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if sp.is_byte(i):
                lengths[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i)):
                lengths[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode())
        return lengths

    # ------------------------------------------------------------------- saving, loading

    def save(self, directory) -> pathlib.Path:
        """Our meta (kind "hf") plus the original files under `hf/`."""
        directory = pathlib.Path(directory)
        self.save_hf(directory / FILES_DIR)
        meta = {"kind": KIND, "files": FILES_DIR, "vocab_size": self.vocab_size, "pad_id": self.pad_id,
                "eos_id": self.eos_id, "bos_id": self.bos_id, "add_special_tokens": self.add_special_tokens}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return directory

    def save_hf(self, directory) -> pathlib.Path:
        """The original files, as a Hugging Face checkpoint directory keeps them."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (directory / name).write_bytes(data)
        return directory

    @classmethod
    def load(cls, directory, *, add_special_tokens: bool | None = None) -> "HFTokenizer":
        """From a run directory's `tokenizer/` (our meta) or a Hugging Face checkpoint directory."""
        directory = pathlib.Path(directory)
        meta = _our_meta(directory)
        if meta is not None:
            files = _read_files(directory / meta.get("files", FILES_DIR))
            fallback = {"bos": meta.get("bos_id"), "eos": meta.get("eos_id"), "pad": meta.get("pad_id")}
            flag = meta.get("add_special_tokens", False) if add_special_tokens is None else add_special_tokens
            return cls(files, fallback_ids=fallback, add_special_tokens=flag)
        files = _read_files(directory)
        config = directory / "config.json"
        ids = json.loads(config.read_text()) if config.is_file() else {}
        fallback = {k: _first(ids.get(f"{k}_token_id")) for k in ("bos", "eos", "pad")}
        return cls(files, fallback_ids=fallback, add_special_tokens=bool(add_special_tokens))


def _our_meta(directory: pathlib.Path) -> dict | None:
    """Our tokenizer meta if `directory` holds one of kind "hf" (theirs has no "kind")."""
    path = directory / META_FILE
    if not path.is_file() or path.stat().st_size > 1 << 16:  # theirs is megabytes, ours a few lines
        return None
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("kind") not in (None, KIND):
        raise InteropError(f"{path} is an llm_jax tokenizer of kind {meta['kind']!r}, not a Hugging Face one "
                           f"(kind {KIND!r}); load it with llm_jax.data.tokenizers.load_tokenizer")
    return meta if meta.get("kind") == KIND else None


def _read_files(directory: pathlib.Path) -> dict[str, bytes]:
    files = {name: (directory / name).read_bytes() for name in TOKENIZER_FILES if (directory / name).is_file()}
    if "tokenizer.json" not in files and "tokenizer.model" not in files:
        raise FileNotFoundError(f"{directory} has no Hugging Face tokenizer: neither tokenizer.json nor "
                                f"tokenizer.model")
    return files


def has_hf_tokenizer(directory) -> bool:
    directory = pathlib.Path(directory)
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))


def load_hf_tokenizer(directory, *, add_special_tokens: bool | None = None) -> HFTokenizer:
    """`HFTokenizer.load`: a run directory's saved tokenizer, or a Hugging Face checkpoint's."""
    return HFTokenizer.load(directory, add_special_tokens=add_special_tokens)
