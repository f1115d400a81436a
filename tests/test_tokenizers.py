"""Tokenizers: lossless round trips, byte fallback, save/load, determinism, bad input."""

import pathlib
import sysconfig

import pytest

from llm_jax.data.tokenizers import (
    MIN_SENTENCEPIECE_VOCAB,
    CharTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_tokenizer,
)

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
TRICKY = "def f(x):\n\tif x:\n        return  'é'  \n\n  # trailing spaces   \n"
UNSEEN = "中文 🙂 ünïcödé ∑"


@pytest.fixture(scope="module")
def python_source():
    return [(STDLIB / name).read_text() for name in
            ["textwrap.py", "string.py", "bisect.py", "heapq.py", "functools.py", "abc.py", "copy.py", "glob.py"]]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def sentencepiece(request, python_source):
    return SentencePieceTokenizer.train(python_source, 1024, request.param)


def test_sentencepiece_round_trips_code_and_unseen_unicode(sentencepiece, python_source):
    for text in [TRICKY, UNSEEN, python_source[0], "", " ", "\n\n"]:
        assert sentencepiece.decode(sentencepiece.encode(text)) == text
    ids = sentencepiece.encode(UNSEEN)
    assert sentencepiece.unk_id not in ids  # byte fallback: never out of vocabulary
    assert sentencepiece.vocab_size == 1024
    assert (sentencepiece.pad_id, sentencepiece.unk_id, sentencepiece.bos_id, sentencepiece.eos_id) == (0, 1, 2, 3)


def test_indentation_and_newlines_are_single_pieces(sentencepiece):
    pieces = [sentencepiece.processor.id_to_piece(i) for i in sentencepiece.encode("        return x\n")]
    assert pieces[-1] == "\n"
    assert len(pieces) <= 5, pieces  # e.g. ['▁▁▁▁▁▁▁▁', 'return', '▁x', '\n']


def test_token_bytes_add_up_to_the_utf8_length(sentencepiece, python_source):
    for text in [TRICKY, UNSEEN, python_source[1]]:
        assert sum(sentencepiece.token_bytes(i) for i in sentencepiece.encode(text)) == len(text.encode())
    assert sentencepiece.token_bytes(sentencepiece.eos_id) == 0


def test_bpe_compresses_python_source():
    texts = [p.read_text(errors="replace") for p in sorted(STDLIB.glob("*.py"))[:60]]
    tok = SentencePieceTokenizer.train(texts, 4096, "bpe", max_chars=1_500_000)
    held_out = (STDLIB / "os.py").read_text()
    ratio = len(tok.encode(held_out)) / len(held_out.encode())
    assert ratio < 0.35, ratio  # ~0.3 tokens per byte; bytes alone would be 1.0


def test_training_is_deterministic_and_save_load_is_identical(python_source, tmp_path):
    a = SentencePieceTokenizer.train(python_source, 600, "bpe")
    b = SentencePieceTokenizer.train(python_source, 600, "bpe")
    assert a.model_proto == b.model_proto
    loaded = load_tokenizer(a.save(tmp_path / "sp"))
    assert isinstance(loaded, SentencePieceTokenizer)
    for text in [TRICKY, UNSEEN, python_source[2]]:
        assert loaded.encode(text) == a.encode(text)


def test_char_tokenizer_round_trip_unk_and_save(tmp_path):
    tok = CharTokenizer.from_text(TRICKY)
    assert tok.decode(tok.encode(TRICKY)) == TRICKY
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.vocab_size == len(set(TRICKY)) + 3
    assert tok.encode("é€") == [tok.encode("é")[0], tok.unk_id]
    assert tok.decode([tok.eos_id, tok.pad_id] + tok.encode("if")) == "if"
    assert tok.token_bytes(tok.encode("é")[0]) == 2 and tok.token_bytes(tok.eos_id) == 0
    loaded = load_tokenizer(tok.save(tmp_path / "char"))
    assert isinstance(loaded, CharTokenizer) and loaded.encode(TRICKY) == tok.encode(TRICKY)


def test_train_tokenizer_dispatches_on_kind(python_source):
    assert isinstance(train_tokenizer("char", ["abc", "cd"], 16), CharTokenizer)
    sp = train_tokenizer("sentencepiece", python_source, 512, model_type="unigram")
    assert isinstance(sp, SentencePieceTokenizer) and sp.vocab_size == 512


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=f"at least {MIN_SENTENCEPIECE_VOCAB}"):
        SentencePieceTokenizer.train(["some text"], 100)
    with pytest.raises(ValueError, match="empty text"):
        SentencePieceTokenizer.train(["", "\n\n  \n"], 1000)
    with pytest.raises(ValueError, match="'bpe' or 'unigram'"):
        SentencePieceTokenizer.train(["x"], 1000, "wordpiece")
    with pytest.raises(ValueError, match="empty text"):
        CharTokenizer.from_text("")
    with pytest.raises(ValueError, match="5 distinct characters.*vocab_size=4"):
        train_tokenizer("char", ["abcde"], 4)
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bytes'"):
        train_tokenizer("bytes", ["abc"], 100)
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"kind": "wordpiece"}')
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no sentencepiece model"):
        SentencePieceTokenizer.load(tmp_path / "missing.model")
