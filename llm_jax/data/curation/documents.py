"""Documents and the readers that turn raw input into them, streaming.

A reader never raises on a bad document: a binary file, bytes that are not UTF-8 or a
JSONL line that is not an object with the text field becomes a `Document` whose
`problem` says so, and the chain's `input` step counts it as a removal. Errors about the
input as a whole (a path that does not exist, a directory with no files) are raised
before the first document, so a long run never stops half way because of one file.

Every document carries an `ordinal` (its position in the input stream): deduplication
keeps the first of a group of duplicates, and "first" is the smallest ordinal both in
the local runner and in the Beam pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Iterator, Literal, Sequence

# Problems a reader can find in one document (each becomes the removal reason input:<problem>).
PROBLEMS = ("binary", "invalid_utf8", "bad_json", "missing_field", "too_large", "unreadable")
InputFormat = Literal["auto", "directory", "text", "jsonl", "tfds"]

# Bytes looked at to decide whether a file is binary: a NUL byte, or many control
# characters, in the first block (what `file` and git do, roughly).
_SNIFF_BYTES = 8192
_MAX_CONTROL_FRACTION = 0.3
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\v\b\x1b")


@dataclasses.dataclass(frozen=True)
class Document:
    id: str
    text: str
    ordinal: int = 0
    # Bytes of the raw input (before decoding), what the report counts as read.
    size_bytes: int = 0
    problem: str | None = None
    # Where a bad document came from, said in words for the report.
    problem_detail: str = ""


def looks_binary(head: bytes) -> bool:
    """True for data that is not text: a NUL byte or mostly control characters."""
    if b"\0" in head:
        return True
    if not head:
        return False
    controls = sum(1 for b in head if b < 32 and b not in _TEXT_CONTROLS)
    return controls / len(head) > _MAX_CONTROL_FRACTION


def decode(raw: bytes, doc_id: str, ordinal: int, invalid_utf8: str = "remove") -> Document:
    """Bytes -> Document; invalid UTF-8 is flagged ("remove") or replaced with U+FFFD ("replace")."""
    if looks_binary(raw[:_SNIFF_BYTES]):
        return Document(doc_id, "", ordinal, len(raw), "binary", "NUL or control bytes in the first 8 KiB")
    try:
        return Document(doc_id, raw.decode("utf-8"), ordinal, len(raw))
    except UnicodeDecodeError as e:
        if invalid_utf8 == "replace":
            return Document(doc_id, raw.decode("utf-8", errors="replace"), ordinal, len(raw))
        return Document(doc_id, "", ordinal, len(raw), "invalid_utf8", f"{e.reason} at byte {e.start}")


def list_files(root: pathlib.Path, extensions: Sequence[str] | None) -> list[pathlib.Path]:
    """Regular files under `root` (recursive, sorted), optionally only these extensions."""
    suffixes = None if extensions is None else tuple(e.lower() for e in extensions)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if suffixes is None or name.lower().endswith(suffixes):
                found.append(pathlib.Path(dirpath, name))
    return sorted(found)


def read_files(paths: Sequence[pathlib.Path], *, root: pathlib.Path | None = None, max_bytes: int,
               invalid_utf8: str = "remove") -> Iterator[Document]:
    """One document per file; files over `max_bytes` are flagged without being read."""
    for ordinal, path in enumerate(paths):
        doc_id = str(path.relative_to(root)) if root is not None else str(path)
        try:
            size = path.stat().st_size
            if size > max_bytes:
                yield Document(doc_id, "", ordinal, size, "too_large", f"{size:,} bytes > {max_bytes:,}")
                continue
            raw = path.read_bytes()
        except OSError as e:  # unreadable (permissions, vanished): counted, not fatal
            yield Document(doc_id, "", ordinal, 0, "unreadable", e.strerror or str(e))
            continue
        yield decode(raw, doc_id, ordinal, invalid_utf8)


def read_jsonl(path: pathlib.Path, text_field: str = "text", *, max_bytes: int,
               invalid_utf8: str = "remove") -> Iterator[Document]:
    """One document per line of a JSON Lines file; its `id` field, if any, names it."""
    with open(path, "rb") as f:
        for lineno, (line, size) in enumerate(_bounded_lines(f, max_bytes), start=1):
            ordinal = lineno - 1
            doc_id = f"{path.name}:{lineno}"
            if line is None:
                yield Document(doc_id, "", ordinal, size, "too_large", f"{size:,} bytes > {max_bytes:,}")
            elif line.strip():  # blank lines are not documents (a trailing newline, spacing)
                yield _json_document(line, doc_id, ordinal, text_field, invalid_utf8)


def _bounded_lines(f, max_bytes: int, chunk: int = 1 << 20) -> Iterator[tuple[bytes | None, int]]:
    """(line, bytes) per line of `f`; a line over `max_bytes` is (None, bytes), skipped in
    chunks, so one enormous line never has to fit in memory."""
    while line := f.readline(max_bytes + 1):
        size = len(line)
        if size <= max_bytes:
            yield line, size
            continue
        while not line.endswith(b"\n") and (line := f.readline(chunk)):
            size += len(line)
        yield None, size


def _json_document(line: bytes, doc_id: str, ordinal: int, text_field: str, invalid_utf8: str) -> Document:
    size = len(line)
    try:
        record = json.loads(line.decode("utf-8", errors="strict" if invalid_utf8 == "remove" else "replace"))
    except UnicodeDecodeError as e:
        return Document(doc_id, "", ordinal, size, "invalid_utf8", f"{e.reason} at byte {e.start}")
    except json.JSONDecodeError as e:
        return Document(doc_id, "", ordinal, size, "bad_json", str(e))
    if not isinstance(record, dict):
        return Document(doc_id, "", ordinal, size, "bad_json", f"a JSON {type(record).__name__}, not an object")
    text = record.get(text_field)
    if not isinstance(text, str):
        have = sorted(record)[:8]
        return Document(doc_id, "", ordinal, size, "missing_field",
                        f"no string field {text_field!r} (fields: {have})")
    if isinstance(record.get("id"), (str, int)):
        doc_id = str(record["id"])
    return Document(doc_id, text, ordinal, size)


def read_tfds(name: str, data_dir: str | os.PathLike | None, split: str = "train", text_field: str = "text",
              *, invalid_utf8: str = "remove") -> Iterator[Document]:
    """The documents of a prepared tfds dataset split (array_record; never downloads)."""
    import tensorflow_datasets as tfds

    from llm_jax.data.corpora import load_tfds_corpus

    load_tfds_corpus(name, data_dir, text_field=text_field, train_split=split, validation_split=split)  # checks
    source = tfds.builder(name, data_dir=data_dir, try_gcs=False).as_data_source(split=split)
    for i in range(len(source)):
        value = source[i][text_field]
        doc_id = f"{split}/{i}"
        if isinstance(value, str):
            value = value.encode("utf-8", "surrogatepass")
        yield decode(value, doc_id, i, invalid_utf8)


def detect_format(path: pathlib.Path) -> str:
    """What `--format auto` reads `path` as."""
    if path.is_dir():
        return "directory"
    if path.is_file():
        return "jsonl" if path.name.lower().endswith((".jsonl", ".ndjson")) else "text"
    raise FileNotFoundError(f"input {path} does not exist (for a tfds dataset, pass its name with --format tfds)")


def read_input(path: str | os.PathLike, fmt: InputFormat = "auto", *, text_field: str = "text",
               extensions: Sequence[str] | None = None, data_dir: str | None = None, split: str = "train",
               max_bytes: int = 64 << 20, invalid_utf8: str = "remove") -> Iterator[Document]:
    """The documents of a directory (one per file), a text file (one), a JSONL file or a tfds dataset.

    Problems with the input as a whole are raised here, before the first document is read.
    """
    if invalid_utf8 not in ("remove", "replace"):
        raise ValueError(f"invalid_utf8 must be 'remove' or 'replace', got {invalid_utf8!r}")
    if fmt == "tfds":
        return read_tfds(str(path), data_dir, split, text_field, invalid_utf8=invalid_utf8)
    path = pathlib.Path(path).expanduser()
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "directory":
        if not path.is_dir():
            raise NotADirectoryError(f"input {path} is not a directory")
        files = list_files(path, extensions)
        if not files:
            which = "files" if extensions is None else f"files ending in {list(extensions)}"
            raise ValueError(f"input directory {path} has no {which}")
        return read_files(files, root=path, max_bytes=max_bytes, invalid_utf8=invalid_utf8)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    if fmt == "jsonl":
        return read_jsonl(path, text_field, max_bytes=max_bytes, invalid_utf8=invalid_utf8)
    if fmt == "text":
        return read_files([path], max_bytes=max_bytes, invalid_utf8=invalid_utf8)
    raise ValueError(f"unknown input format {fmt!r}; choose one of auto, directory, text, jsonl, tfds")


def read_examples(path: str | os.PathLike, what: str, text_field: str = "text") -> list[str]:
    """User-supplied example texts: JSONL (a text field per line), a directory (a file each),
    or a text file with one example per line. `what` names them in errors."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_file() and not path.name.lower().endswith((".jsonl", ".ndjson")):
        texts = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    else:
        docs = read_input(path, text_field=text_field, invalid_utf8="replace")
        texts = [d.text.strip() for d in docs if d.problem is None]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"{what} {path} holds no non-empty examples")
    return texts
