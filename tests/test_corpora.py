"""Corpora through tensorflow-datasets: documents, splits, reuse, bad input, catalog path."""

import hashlib
import os
import pickle

import grain
import pytest
import tensorflow_datasets as tfds

from llm_jax.data import corpora


def write_files(directory, texts, suffix=".txt"):
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(texts):
        path = directory / f"doc_{i:03d}{suffix}"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def all_docs(documents):
    return [documents[i] for i in range(len(documents))]


def fingerprint_dirs(corpus_dir):
    """The config directories tfds made for a corpus (it keeps its own files in `.config`)."""
    return sorted(p.name for p in corpus_dir.iterdir() if not p.name.startswith("."))


def paragraphs(n, chars=300):
    """`n` distinct paragraphs of about `chars` characters, separated by blank lines."""
    return "".join(f"paragraph {i}: " + "lorem ipsum " * (chars // 12) + "\n\n" for i in range(n))


@pytest.fixture
def count_writes(monkeypatch):
    """How many times a corpus was (re)written."""
    calls = []
    write = corpora._write

    def counting_write(*args, **kwargs):
        calls.append(args[1])  # the version directory
        return write(*args, **kwargs)

    monkeypatch.setattr(corpora, "_write", counting_write)
    return calls


# --- documents and splits ---------------------------------------------------------------


def test_hash_split_is_stable_and_near_the_fraction(tmp_path):
    texts = [f"document number {i}\n" * (1 + i % 5) for i in range(200)]
    write_files(tmp_path / "docs", texts)
    first = corpora.prepare_text_corpus(tmp_path / "docs", tmp_path / "a", validation_fraction=0.2)
    second = corpora.prepare_text_corpus(tmp_path / "docs", tmp_path / "b", validation_fraction=0.2)

    validation = all_docs(first.validation)
    assert validation == all_docs(second.validation)
    assert sorted(validation + all_docs(first.train)) == sorted(texts)
    assert 0.12 <= len(validation) / len(texts) <= 0.28
    # The split is a content hash (not Python's salted hash()), so it holds on any machine.
    expected = [t for t in texts
                if int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") < 0.2 * 2**64]
    assert validation == expected
    assert first.stats == corpora.CorpusStats(files=200, documents=200,
                                              bytes=sum(len(t) for t in texts), undecodable_files=0)


def test_tail_split_of_one_file_cuts_at_the_exact_character(tmp_path):
    text = paragraphs(100)
    (tmp_path / "input.txt").write_text(text)
    corpus = corpora.prepare_text_corpus(tmp_path / "input.txt", tmp_path / "data", split="tail",
                                         validation_fraction=0.1, min_document_chars=1000)
    cut = round(len(text) * 0.9)
    assert "".join(all_docs(corpus.train)) == text[:cut]
    assert "".join(all_docs(corpus.validation)) == text[cut:]
    assert corpus.name == "input"


def test_tail_split_of_several_files_takes_the_last_files(tmp_path):
    texts = [f"{i}" * 100 for i in range(10)]  # ten files of 100 bytes
    paths = write_files(tmp_path / "docs", texts)
    corpus = corpora.prepare_text_corpus(list(reversed(paths)), tmp_path / "data", split="tail",
                                         validation_fraction=0.2)
    assert all_docs(corpus.train) == texts[:8]  # sorted order, whatever order was given
    assert all_docs(corpus.validation) == texts[8:]


def test_a_single_file_is_cut_into_documents_at_blank_lines(tmp_path):
    text = paragraphs(60) + "".join(f"line {i} without a blank line after it\n" for i in range(3000))
    (tmp_path / "big.txt").write_text(text)
    corpus = corpora.prepare_text_corpus(tmp_path / "big.txt", tmp_path / "data", split="tail",
                                         validation_fraction=0.3, min_document_chars=1000)
    train, validation = all_docs(corpus.train), all_docs(corpus.validation)
    docs = train + validation
    assert "".join(docs) == text  # lossless
    assert all(len(d) >= 1000 for d in train[:-1] + validation[:-1])  # each part's last may be short
    # Paragraph documents end at a blank line; the long blank-free stretch is cut at line
    # ends into documents of ordinary size instead of one huge one.
    assert docs[0].endswith("\n\n") and docs[0].startswith("paragraph 0:")
    assert max(len(d) for d in docs) < 4 * 1000
    assert corpus.stats.documents == len(docs) and corpus.stats.files == 1


def test_hash_split_of_one_file_uses_its_paragraphs(tmp_path):
    text = paragraphs(400)
    (tmp_path / "book.md").write_text(text)
    corpus = corpora.prepare_text_corpus(tmp_path / "book.md", tmp_path / "data",
                                         min_document_chars=600)
    docs = all_docs(corpus.train) + all_docs(corpus.validation)
    assert len(corpus.validation) > 0 and len(docs) > 100
    assert sorted(docs) == sorted(corpora._documents(text, 600))


# --- reuse ------------------------------------------------------------------------------


def test_prepared_corpus_is_reused_until_the_inputs_change(tmp_path, count_writes):
    paths = write_files(tmp_path / "docs", [f"text {i}\n" * 3 for i in range(40)])
    data = tmp_path / "data"
    first = corpora.prepare_text_corpus(tmp_path / "docs", data, validation_fraction=0.2)
    again = corpora.prepare_text_corpus(tmp_path / "docs", data, validation_fraction=0.2)
    assert len(count_writes) == 1
    assert all_docs(again.train) == all_docs(first.train) and again.stats == first.stats

    os.utime(paths[0], ns=(0, 1_000_000_000))  # same bytes, new mtime
    corpora.prepare_text_corpus(tmp_path / "docs", data, validation_fraction=0.2)
    paths[1].write_text("new content\n")
    changed = corpora.prepare_text_corpus(tmp_path / "docs", data, validation_fraction=0.2)
    corpora.prepare_text_corpus(tmp_path / "docs", data, validation_fraction=0.25)
    assert len(count_writes) == 4 and len(set(count_writes)) == 4
    assert "new content\n" in all_docs(changed.train) + all_docs(changed.validation)
    # Each version lives in its own fingerprint directory under data_dir/<name>/.
    assert fingerprint_dirs(data / "docs") == sorted(p.parent.name for p in count_writes)


def test_documents_are_picklable_and_a_grain_source(tmp_path):
    write_files(tmp_path / "docs", [f"text {i}\n" for i in range(50)])
    corpus = corpora.prepare_text_corpus(tmp_path / "docs", tmp_path / "data", validation_fraction=0.3)
    restored = pickle.loads(pickle.dumps(corpus.train))
    assert all_docs(restored) == all_docs(corpus.train)
    dataset = grain.MapDataset.source(corpus.train)
    assert len(dataset) == len(corpus.train) and isinstance(dataset[0], str)


# --- encodings --------------------------------------------------------------------------


def test_non_utf8_files_are_decoded_with_replacement_and_counted(tmp_path):
    texts = [f"fine text {i}\n" for i in range(30)] + [b"latin-1 caf\xe9\n"]
    write_files(tmp_path / "docs", texts)
    message = r"1 of 31 corpus files are not valid UTF-8 \(e.g. .*doc_030.txt"
    with pytest.warns(UserWarning, match=message):
        corpus = corpora.prepare_text_corpus(tmp_path / "docs", tmp_path / "data",
                                             validation_fraction=0.3)
    assert corpus.stats.undecodable_files == 1
    assert "latin-1 caf\ufffd\n" in all_docs(corpus.train) + all_docs(corpus.validation)


# --- bad input --------------------------------------------------------------------------


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt does not exist"):
        corpora.prepare_text_corpus(tmp_path / "nowhere.txt", tmp_path / "data")


def test_directory_without_matching_files_names_dir_and_extensions(tmp_path):
    write_files(tmp_path / "docs", ["a", "b"], suffix=".csv")
    with pytest.raises(ValueError, match=r"docs has no files ending in any of \['.txt', '.md'\]"):
        corpora.prepare_text_corpus(tmp_path / "docs", tmp_path / "data", extensions=(".txt", ".md"))


def test_empty_corpus_is_an_error(tmp_path):
    write_files(tmp_path / "docs", ["", "", ""])
    with pytest.raises(ValueError, match="the corpus is empty: all 3 input files are empty"):
        corpora.prepare_text_corpus(tmp_path / "docs", tmp_path / "data")


def test_empty_validation_split_suggests_a_larger_fraction(tmp_path):
    write_files(tmp_path / "docs", ["one", "two", "three"])
    with pytest.raises(ValueError, match="validation split is empty.*larger validation_fraction"):
        corpora.prepare_text_corpus(tmp_path / "docs", tmp_path / "data", validation_fraction=0.001)
    assert not (tmp_path / "data").exists()  # nothing half-written


def test_empty_train_split_suggests_a_smaller_fraction(tmp_path):
    paths = write_files(tmp_path / "docs", ["x" * 10, "y" * 10])
    with pytest.raises(ValueError, match="train split is empty.*smaller validation_fraction"):
        corpora.prepare_text_corpus(paths, tmp_path / "data", split="tail", validation_fraction=0.9)


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "random"}, "split must be 'hash' or 'tail', got 'random'"),
    ({"validation_fraction": 1.0}, r"validation_fraction must be in \(0, 1\), got 1.0"),
    ({"min_document_chars": 0}, "min_document_chars must be a positive int, got 0"),
    ({"name": "My Corpus"}, "name must be lowercase.*got 'My Corpus'"),
    ({"extensions": ("txt",)}, "extensions must look like '.txt', got 'txt'"),
])
def test_bad_settings_are_named(tmp_path, kwargs, message):
    write_files(tmp_path / "docs", ["a", "b"])
    with pytest.raises(ValueError, match=message):
        corpora.prepare_text_corpus(tmp_path / "docs", tmp_path / "data", **kwargs)


# --- tfds datasets by name --------------------------------------------------------------


def test_catalog_dataset_reads_as_str_documents_under_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=7):
        corpus = corpora.load_tfds_corpus("lm1b", tmp_path, validation_split="test")
    assert corpus.name == "lm1b" and corpus.stats is None
    assert len(corpus.train) == 7 and len(corpus.validation) == 7
    assert all(isinstance(doc, str) and doc for doc in all_docs(corpus.train))


def test_catalog_dataset_not_prepared_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"run `tfds build lm1b --data_dir={tmp_path}"
                                                " --file_format=array_record`"):
        corpora.load_tfds_corpus("lm1b", tmp_path)


def test_unknown_tfds_name_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no tfds dataset 'no_such_corpus'"):
        corpora.load_tfds_corpus("no_such_corpus", tmp_path)


def test_prepared_corpus_loads_by_name_and_names_missing_split_and_field(tmp_path):
    write_files(tmp_path / "docs", [f"text {i}\n" for i in range(50)])
    corpus = corpora.prepare_text_corpus(tmp_path / "docs", tmp_path / "data", validation_fraction=0.3)
    (fingerprint,) = fingerprint_dirs(tmp_path / "data" / "docs")
    name = f"docs/{fingerprint}"

    loaded = corpora.load_tfds_corpus(name, tmp_path / "data")
    assert all_docs(loaded.validation) == all_docs(corpus.validation)
    with pytest.raises(ValueError, match=r"no split 'test'; its splits are \['train', 'validation'\]"):
        corpora.load_tfds_corpus(name, tmp_path / "data", validation_split="test")
    with pytest.raises(ValueError, match=r"no feature text_field='body'; its features are \['text'\]"):
        corpora.load_tfds_corpus(name, tmp_path / "data", text_field="body")


# --- the standard library ---------------------------------------------------------------


def test_stdlib_sources_are_the_standard_library_only():
    sources = corpora.stdlib_sources()
    root = corpora.stdlib_root()
    assert root / "os.py" in sources
    assert sources == sorted(sources) and all(p.suffix == ".py" for p in sources)
    assert not any({"site-packages", "dist-packages"} & set(p.relative_to(root).parts) for p in sources)


def test_a_slice_of_the_stdlib_prepares(tmp_path):
    files = [p for p in corpora.stdlib_sources() if p.parent == corpora.stdlib_root()][:60]
    corpus = corpora.prepare_text_corpus(files, tmp_path, name="stdlib_slice", validation_fraction=0.2)
    assert corpus.stats.files == 60 and corpus.stats.bytes == sum(p.stat().st_size for p in files)
    assert len(corpus.train) + len(corpus.validation) == corpus.stats.documents
    assert any("def " in doc for doc in all_docs(corpus.train))
