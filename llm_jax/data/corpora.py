"""Text corpora as tensorflow-datasets: local text prepared once, catalog datasets read in place.

Local text (`prepare_text_corpus`, `stdlib_corpus`) becomes a real tfds dataset with
`train` and `validation` splits in array_record files, written by a tfds builder and read
back through `as_data_source` (random access, no TensorFlow). A prepared corpus lives at

    data_dir/<name>/<fingerprint>/<version>/   (tfds's dataset/config/version layout;
                                               tfds adds its own data_dir/<name>/.config/)

where the fingerprint hashes the resolved input paths, their sizes and mtimes, and the
split settings: a second call with the same inputs reuses the files, and changed inputs
are written to a new fingerprint directory (old ones are left for the user to delete).

Documents: with several input files each non-empty file is one document. A single input
file is cut into documents at blank lines, merging consecutive blocks until each reaches
`min_document_chars` (stretches with no blank line are cut at line ends instead), so one
file still gets a stable hash split. Cutting is lossless: the documents concatenate back
to the text.

Splits: `split="hash"` sends a document to validation iff the SHA-256 of its text falls
below `validation_fraction` (stable across runs and machines; duplicates share a split).
`split="tail"` is nanoGPT's shakespeare_char recipe: a single file is cut at character
`(1 - validation_fraction) * len(text)` and the tail is validation; with several files,
the last files in sorted order whose bytes come closest to that fraction are validation.

Catalog datasets (lm1b, c4, wikipedia, ...) must already be prepared in array_record
format (`tfds build NAME --data_dir=DIR --file_format=array_record`); `load_tfds_corpus`
only reads them and never downloads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import sysconfig
import tempfile
import time
import types
import warnings
from typing import Any, Literal, Protocol, Sequence

import tensorflow_datasets as tfds

_log = logging.getLogger(__name__)

# The tfds version of prepared local corpora: bump it when the way files become documents
# changes, so that corpora prepared by older code are rebuilt rather than reused.
_VERSION = "1.0.0"

# Text and source code a language model can learn from; data formats (json, csv) are left
# out because a directory of them is usually a dataset, not prose or code.
DEFAULT_EXTENSIONS = (
    ".txt", ".md", ".rst", ".tex",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts", ".go", ".rs", ".sh",
)

# Installed packages are not part of the standard library, though they may live under it.
_THIRD_PARTY_DIRS = frozenset({"site-packages", "dist-packages"})

_BLANK_LINES = re.compile(r"\n\s*\n")
_LINE_END = re.compile(r"\n")
# A stretch this many times `min_document_chars` without a blank line (code, one sentence
# per line) would otherwise become one huge document; it is cut at line ends instead.
_MAX_BLOCK_FACTOR = 16


class Documents(Protocol):
    """Random access to the texts of one split (what grain's `MapDataset.source` takes)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> str: ...


@dataclasses.dataclass(frozen=True)
class CorpusStats:
    files: int
    documents: int
    bytes: int
    # Files that were not valid UTF-8: decoded with U+FFFD replacement characters.
    undecodable_files: int


@dataclasses.dataclass(frozen=True)
class Corpus:
    name: str
    train: Documents
    validation: Documents
    stats: CorpusStats | None = None  # None for catalog datasets


class _TextOf:
    """One text feature of a tfds data source, as `str`; picklable for grain workers."""

    def __init__(self, source: Sequence[dict[str, Any]], field: str):
        self._source = source
        self._field = field

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> str:
        value = self._source[i][self._field]
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        if isinstance(value, str):  # tfds's mock data yields str
            return value
        raise TypeError(f"feature {self._field!r} holds {type(value).__name__}, not text")

    def __repr__(self) -> str:
        return f"_TextOf({self._field!r}, {len(self)} documents)"


# ---------------------------------------------------------------------------------------
# The standard library, a corpus every Python has.


def stdlib_root() -> pathlib.Path:
    """The running interpreter's standard-library directory."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources() -> list[pathlib.Path]:
    """The standard library's `.py` files, sorted, without installed packages."""
    return _walk(stdlib_root(), (".py",), skip_dirs=_THIRD_PARTY_DIRS)


def stdlib_corpus(data_dir: str | os.PathLike, *, validation_fraction: float = 0.05,
                  split: str = "hash") -> Corpus:
    """The standard library's source as a corpus: one document per file, hash split (or the
    last files in sorted order, `split="tail"`)."""
    return prepare_text_corpus(stdlib_sources(), data_dir, split=split, validation_fraction=validation_fraction,
                               name="stdlib")


# ---------------------------------------------------------------------------------------
# Local text -> tfds dataset.


def prepare_text_corpus(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    data_dir: str | os.PathLike,
    *,
    split: Literal["hash", "tail"] = "hash",
    validation_fraction: float = 0.05,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    name: str | None = None,
    min_document_chars: int = 2048,
) -> Corpus:
    """A file, a directory (recursive) or a list of paths as a prepared tfds corpus.

    `extensions` selects files inside directories; files named directly are always taken.
    The whole text is held in memory while it is written (once per fingerprint).
    """
    settings = _check_settings(split, validation_fraction, min_document_chars)
    files = _input_files(paths, extensions)
    name = _corpus_name(name, files)
    version_dir = pathlib.Path(data_dir).expanduser() / name / _fingerprint(files, settings) / _VERSION
    if not _is_prepared(version_dir):
        start = time.perf_counter()
        splits, stats = _split_corpus(files, **settings)
        _write(name, version_dir, splits, stats, settings)
        _log.info("prepared corpus %s in %.1f s: %s -> %s", name, time.perf_counter() - start,
                  stats, version_dir)
    return _read_prepared(name, version_dir)


def write_documents_corpus(documents: Sequence[str], data_dir: str | os.PathLike, name: str, *,
                           validation_fraction: float = 0.05, config: str = "curated",
                           stats: CorpusStats | None = None) -> Corpus:
    """Documents already cut and cleaned (llm_jax.data.curation) as a tfds corpus, hash split.

    Written to data_dir/<name>/<config>/<version>, which `load_tfds_corpus(name, data_dir)`
    (`data.source=tfds data.tfds_name=NAME data.data_dir=DATA_DIR`) reads. If the hash split
    leaves validation empty (a handful of documents), the last document validates.
    """
    name = check_documents_corpus(name, validation_fraction)
    version_dir = pathlib.Path(data_dir).expanduser() / name / config / _VERSION
    if version_dir.exists():
        raise FileExistsError(f"{version_dir} already exists: write into a new data_dir or delete it")
    if len(documents) < 2:
        raise ValueError(f"a corpus needs at least 2 documents (train and validation), got {len(documents)}")
    train, validation = _hash_split(list(documents), validation_fraction)
    if not validation:
        train, validation = train[:-1], train[-1:]
    if not train:
        train, validation = validation[:-1], validation[-1:]
    stats = stats or CorpusStats(files=0, documents=len(documents), undecodable_files=0,
                                 bytes=sum(len(d.encode("utf-8", "surrogatepass")) for d in documents))
    _write(name, version_dir, {"train": train, "validation": validation}, stats,
           {"validation_fraction": validation_fraction, "source": config})
    return _read_prepared(name, version_dir)


def check_documents_corpus(name: str, validation_fraction: float) -> str:
    """`write_documents_corpus`'s settings checked (the name returned), so a long curation run
    can refuse them before it starts rather than after."""
    _check_settings("hash", validation_fraction, 1)
    return _corpus_name(name, [])


def _check_settings(split: str, validation_fraction: float, min_document_chars: int) -> dict:
    if split not in ("hash", "tail"):
        raise ValueError(f"split must be 'hash' or 'tail', got {split!r}")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    whole = isinstance(min_document_chars, int) and not isinstance(min_document_chars, bool)
    if not whole or min_document_chars < 1:
        raise ValueError(f"min_document_chars must be a positive int, got {min_document_chars!r}")
    return {"split": split, "validation_fraction": validation_fraction,
            "min_document_chars": min_document_chars}


def _walk(root: pathlib.Path, suffixes: tuple[str, ...], skip_dirs=frozenset()) -> list[pathlib.Path]:
    """Files under `root` whose lowercased name ends in one of `suffixes`, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow symlinked dirs
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        found += [pathlib.Path(dirpath, f) for f in filenames if f.lower().endswith(suffixes)]
    return sorted(found)


def _input_files(paths, extensions: Sequence[str]) -> list[pathlib.Path]:
    """The resolved, sorted, de-duplicated files that `paths` names."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("paths is empty: give a file, a directory or a list of files")
    suffixes = _suffixes(extensions)
    files = set()
    for path in (pathlib.Path(p).expanduser() for p in paths):
        if path.is_dir():
            found = _walk(path, suffixes)
            if not found:
                raise ValueError(f"directory {path} has no files ending in any of {list(suffixes)}"
                                 " (set extensions= to choose others)")
            files.update(found)
        elif path.is_file():
            files.add(path)
        elif not path.exists():
            raise FileNotFoundError(f"corpus input {path} does not exist")
        else:
            raise ValueError(f"corpus input {path} is neither a regular file nor a directory")
    return sorted({p.resolve() for p in files})


def _suffixes(extensions: Sequence[str]) -> tuple[str, ...]:
    extensions = (extensions,) if isinstance(extensions, str) else tuple(extensions)
    if not extensions:
        raise ValueError("extensions is empty: name at least one, e.g. ('.txt',)")
    for ext in extensions:
        if not isinstance(ext, str) or not ext.startswith(".") or len(ext) < 2:
            raise ValueError(f"extensions must look like '.txt', got {ext!r}")
    return tuple(ext.lower() for ext in extensions)


def _corpus_name(name: str | None, files: list[pathlib.Path]) -> str:
    """`name`, checked, or one derived from the inputs (a file's stem, the common directory)."""
    if name is not None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"name must be lowercase letters, digits and '_', starting with a"
                             f" letter (it names a tfds dataset directory), got {name!r}")
        return name
    base = files[0].stem if len(files) == 1 else pathlib.Path(os.path.commonpath(files)).name
    derived = re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_")
    return derived if re.fullmatch(r"[a-z][a-z0-9_]*", derived) else f"corpus_{derived}".rstrip("_")


def _fingerprint(files: list[pathlib.Path], settings: dict) -> str:
    """Changes when a file is added, removed, resized or touched, or a setting changes."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def _is_prepared(version_dir: pathlib.Path) -> bool:
    # tfds writes into a temporary directory and renames it when done, so the info file
    # exists only for a complete dataset.
    return (version_dir / "dataset_info.json").is_file()


# ---------------------------------------------------------------------------------------
# Files -> documents -> splits (plain Python; tfds only writes the result).


def _split_corpus(files: list[pathlib.Path], *, split: str, validation_fraction: float,
                  min_document_chars: int) -> tuple[dict[str, list[str]], CorpusStats]:
    texts, sizes, undecodable = _read_texts(files)
    if not any(texts):
        raise ValueError(f"the corpus is empty: all {len(files)} input files are empty"
                         f" (e.g. {files[0]})")
    if len(files) == 1:
        train, validation = _split_one_text(texts[0], split, validation_fraction, min_document_chars)
    else:
        train, validation = _split_files(texts, sizes, split, validation_fraction)
    for split_name, documents in (("train", train), ("validation", validation)):
        if not documents:
            change = "larger" if split_name == "validation" else "smaller"
            raise ValueError(
                f"the {split_name} split is empty ({len(train) + len(validation)} documents from"
                f" {len(files)} files, split={split!r}, validation_fraction={validation_fraction}):"
                f" use a {change} validation_fraction or more data")
    stats = CorpusStats(files=len(files), documents=len(train) + len(validation), bytes=sum(sizes),
                        undecodable_files=len(undecodable))
    return {"train": train, "validation": validation}, stats


def _read_texts(files: list[pathlib.Path]) -> tuple[list[str], list[int], list[pathlib.Path]]:
    """Every file's text, its size in bytes, and the files that were not valid UTF-8."""
    texts, sizes, undecodable = [], [], []
    for path in files:
        raw = path.read_bytes()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(raw.decode("utf-8", errors="replace"))
            undecodable.append(path)
        sizes.append(len(raw))
    if undecodable:
        warnings.warn(f"{len(undecodable)} of {len(files)} corpus files are not valid UTF-8 (e.g."
                      f" {undecodable[0]}); their bad bytes were replaced by U+FFFD", stacklevel=4)
    return texts, sizes, undecodable


def _split_one_text(text: str, split: str, fraction: float, min_chars: int):
    if split == "tail":
        cut = round(len(text) * (1 - fraction))
        return _documents(text[:cut], min_chars), _documents(text[cut:], min_chars)
    return _hash_split(_documents(text, min_chars), fraction)


def _split_files(texts: list[str], sizes: list[int], split: str, fraction: float):
    if split == "tail":
        start = _tail_start(sizes, fraction)
        return [t for t in texts[:start] if t], [t for t in texts[start:] if t]
    return _hash_split([t for t in texts if t], fraction)


def _hash_split(documents: list[str], fraction: float) -> tuple[list[str], list[str]]:
    train, validation = [], []
    for text in documents:
        # Not Python's hash(): that is salted per process.
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        in_validation = int.from_bytes(digest[:8], "big") < fraction * 2**64
        (validation if in_validation else train).append(text)
    return train, validation


def _tail_start(sizes: list[int], fraction: float) -> int:
    """The first validation file: the suffix whose bytes come closest to `fraction`."""
    target = fraction * sum(sizes)
    best_start, best_gap, suffix = len(sizes), target, 0
    for start in range(len(sizes) - 1, -1, -1):
        suffix += sizes[start]
        if abs(suffix - target) < best_gap:
            best_start, best_gap = start, abs(suffix - target)
        elif suffix > target:
            break
    return best_start


def _documents(text: str, min_chars: int) -> list[str]:
    """`text` cut at blank lines into pieces of at least `min_chars` (the last may be shorter)."""
    documents = []
    for block in _cut(text, _BLANK_LINES, min_chars):
        if len(block) > _MAX_BLOCK_FACTOR * min_chars:
            documents += _cut(block, _LINE_END, min_chars)
        else:
            documents.append(block)
    return documents


def _cut(text: str, separator: re.Pattern, min_chars: int) -> list[str]:
    """Lossless: the pieces end just after a separator and join back to `text`."""
    pieces, start = [], 0
    for match in separator.finditer(text):
        if match.end() - start >= min_chars:
            pieces.append(text[start:match.end()])
            start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


# ---------------------------------------------------------------------------------------
# The tfds builder that writes prepared splits, and reading them back.


class _PreparedText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes documents already split into train / validation, one `text` example each.

    Not registered: every corpus gets a subclass named after it (tfds takes the dataset
    directory from the class's `name`), and corpora are read back from their directory.
    """

    VERSION = tfds.core.Version(_VERSION)

    def __init__(self, *, splits: dict[str, list[str]], stats: CorpusStats, **kwargs):
        self._splits = splits
        self._stats = stats
        super().__init__(**kwargs)  # reads self.info, so the fields above come first

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text files, one document per example (llm_jax.data.corpora).",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            # Keep file order, so that `tail` validation is the end of the text; the input
            # pipeline shuffles training documents itself.
            disable_shuffling=True,
            # Saved with the dataset, so a reused corpus still knows its stats.
            metadata=tfds.core.MetadataDict(stats=dataclasses.asdict(self._stats)),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {name: self._generate_examples(documents) for name, documents in self._splits.items()}

    def _generate_examples(self, documents: list[str]):
        for i, text in enumerate(documents):
            yield i, {"text": text}


def _write(name: str, version_dir: pathlib.Path, splits: dict[str, list[str]], stats: CorpusStats,
           settings: dict) -> None:
    # The fingerprint is a declared config (tfds warns about ad-hoc ones).
    config = tfds.core.BuilderConfig(name=version_dir.parent.name, description=json.dumps(settings))
    builder_class = types.new_class(
        f"_PreparedText_{name}", (_PreparedText,), {"skip_registration": True},
        lambda namespace: namespace.update(name=name, BUILDER_CONFIGS=[config]))
    builder = builder_class(splits=splits, stats=stats, config=config.name, file_format="array_record",
                            data_dir=version_dir.parents[2])
    try:
        # The download directory stays empty; keep it out of data_dir.
        with _no_progress_bars(), tempfile.TemporaryDirectory() as downloads:
            builder.download_and_prepare(download_dir=downloads)
    except OSError:
        # Another process (a second JAX host) may have finished the same corpus first.
        if not _is_prepared(version_dir):
            raise


@contextlib.contextmanager
def _no_progress_bars():
    """tqdm bars of a few-second build only clutter logs; restore the caller's choice."""
    was_enabled = getattr(tfds.core.utils.tqdm_utils, "_active", True)  # tfds has no getter
    tfds.disable_progress_bar()
    try:
        yield
    finally:
        tfds.display_progress_bar(was_enabled)


def _read_prepared(name: str, version_dir: pathlib.Path) -> Corpus:
    builder = tfds.builder_from_directory(version_dir)
    return Corpus(
        name=name,
        train=_TextOf(builder.as_data_source(split="train"), "text"),
        validation=_TextOf(builder.as_data_source(split="validation"), "text"),
        stats=CorpusStats(**builder.info.metadata["stats"]),
    )


# ---------------------------------------------------------------------------------------
# Catalog datasets, prepared beforehand by `tfds build`.


def load_tfds_corpus(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    text_field: str = "text",
    train_split: str = "train",
    validation_split: str = "validation",
) -> Corpus:
    """A tfds dataset already prepared in array_record format in `data_dir`; never downloads.

    `name` may carry a config and version (`wikipedia/20230601.en:1.0.0`); the splits may be
    tfds sub-splits (`train[:1%]`).
    """
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"no tfds dataset {name!r}: it is neither in the tfds catalog nor"
                         f" prepared in data_dir={data_dir}") from None
    features = list(builder.info.features.keys())
    if text_field not in features:
        raise ValueError(f"tfds dataset {name!r} has no feature text_field={text_field!r};"
                         f" its features are {features}")
    return Corpus(
        name=name,
        train=_TextOf(_data_source(builder, name, data_dir, train_split), text_field),
        validation=_TextOf(_data_source(builder, name, data_dir, validation_split), text_field),
    )


def _data_source(builder, name: str, data_dir, split: str):
    """`builder.as_data_source(split)`, its failures explained in terms of what to do."""
    try:
        return builder.as_data_source(split=split)
    except (NotImplementedError, ValueError) as err:
        if not builder.is_prepared():
            dir_flag = f" --data_dir={data_dir}" if data_dir is not None else ""
            raise FileNotFoundError(
                f"tfds dataset {name!r} is not prepared at {builder.data_dir}: run `tfds build"
                f" {name}{dir_flag} --file_format=array_record` (or builder.download_and_prepare("
                "file_format='array_record') with that data_dir)") from err
        available = list(builder.info.splits)
        if split.split("[")[0] not in available:
            raise ValueError(f"tfds dataset {name!r} has no split {split!r}; its splits are"
                             f" {available}") from err
        raise
