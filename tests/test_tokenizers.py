"""Tokenizers: lossless round trips, byte fallback, save/load, determinism, bad input."""

import json
import pathlib
import subprocess
import sys
import sysconfig

import pytest

from llm_jax.data.tokenizers import (
    MAX_TRAINING_LINE_CHARS,
    MIN_SENTENCEPIECE_VOCAB,
    CharTokenizer,
    SentencePieceTokenizer,
    _training_lines,
    load_tokenizer,
    train_tokenizer,
)

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
# Tabs, 8-space indentation, double spaces, trailing spaces, blank lines, a leading space.
TRICKY = " def f(x):\n\tif x:\n        return  'é'  \n\n  # trailing spaces   \n"
UNSEEN = "中文 🙂 ünïcödé ∑\r\n"  # none of these characters is in the training files
MARK = "x = '\u2581'  # sentencepiece's own space marker, as a literal\n"
EDGES = ["", " ", "\n", "\n\n", "  \n\t\n", "a  b", "trailing   "]


@pytest.fixture(scope="module")
def python_source():
    names = ["textwrap.py", "string.py", "bisect.py", "heapq.py", "functools.py", "abc.py", "copy.py", "glob.py"]
    return [(STDLIB / name).read_text() for name in names]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def sentencepiece(request, python_source):
    return SentencePieceTokenizer.train(python_source, 1024, request.param)


def pieces(tok, text):
    return [tok.processor.id_to_piece(i) for i in tok.encode(text)]


# ------------------------------------------------------------------------- sentencepiece


def test_sentencepiece_round_trips_code_prose_and_unseen_unicode(sentencepiece, python_source):
    for text in [TRICKY, UNSEEN, MARK, python_source[0], *EDGES]:
        assert sentencepiece.decode(sentencepiece.encode(text)) == text


def test_byte_fallback_means_nothing_is_out_of_vocabulary(sentencepiece):
    ids = sentencepiece.encode(UNSEEN)
    assert sentencepiece.unk_id not in ids
    han = sentencepiece.encode("中")
    assert [sentencepiece.processor.id_to_piece(i) for i in han] == ["<0xE4>", "<0xB8>", "<0xAD>"]


def test_sentencepiece_special_id_layout(sentencepiece):
    tok = sentencepiece
    assert tok.vocab_size == 1024
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.processor.id_to_piece(4) == "\n"
    assert [tok.processor.id_to_piece(i) for i in (5, 6, 260)] == ["<0x00>", "<0x01>", "<0xFF>"]
    assert tok.encode("\n\n") == [4, 4]


def test_indentation_runs_and_newlines_are_single_pieces(sentencepiece):
    assert pieces(sentencepiece, "        return x\n") == ["▁" * 8, "return", "▁x", "\n"]
    assert pieces(sentencepiece, "    def f(self):\n")[0] == "▁" * 4


def test_decode_drops_specials_and_marks_unknown_ids(sentencepiece):
    tok = sentencepiece
    hi = tok.encode("hi")
    assert tok.decode([tok.bos_id, *hi, tok.eos_id, tok.pad_id, tok.pad_id]) == "hi"
    # unk, and ids a padded model vocabulary has but the tokenizer does not, show as U+FFFD.
    assert tok.decode([*hi, tok.unk_id, tok.vocab_size, 10**6, -1]) == "hi" + "\ufffd" * 4


def test_token_bytes_add_up_to_the_utf8_length(sentencepiece, python_source):
    for text in [TRICKY, UNSEEN, MARK, python_source[1]]:
        assert sum(sentencepiece.token_bytes(i) for i in sentencepiece.encode(text)) == len(text.encode())
    assert [sentencepiece.token_bytes(i) for i in (0, 1, 2, 3, 4, 5)] == [0, 0, 0, 0, 1, 1]


def test_bpe_compresses_held_out_python_source():
    # ~2.5 MB of stdlib modules, capped at 1.5 M characters; the held-out files come after.
    texts = [p.read_text(errors="replace") for p in sorted(STDLIB.glob("*.py")) if p.name < "os.py"]
    tok = SentencePieceTokenizer.train(texts, 4096, "bpe", max_chars=1_500_000)
    assert tok.vocab_size == 4096
    for name in ["os.py", "shutil.py", "subprocess.py"]:
        held_out = (STDLIB / name).read_text()
        ratio = len(tok.encode(held_out)) / len(held_out.encode())
        # Measured 0.30-0.33 tokens per byte on Python 3.11 (bytes alone would be 1.0).
        assert ratio < 0.36, (name, ratio)


def test_training_is_deterministic(python_source):
    for model_type in ["bpe", "unigram"]:
        a = SentencePieceTokenizer.train(python_source, 600, model_type, seed=3)
        b = SentencePieceTokenizer.train(iter(python_source), 600, model_type, seed=3)
        assert a.model_proto == b.model_proto
        assert a.encode(python_source[2]) == b.encode(python_source[2])


def test_seed_picks_the_line_sample(python_source):
    train = lambda seed: SentencePieceTokenizer.train(python_source, 500, max_lines=300, seed=seed).model_proto
    assert train(0) == train(0)
    assert train(0) != train(1)


def test_max_chars_stops_reading_texts(python_source):
    def texts():
        yield python_source[0]
        raise AssertionError("read past max_chars")

    capped = SentencePieceTokenizer.train(texts(), 500, max_chars=5_000)
    assert capped.model_proto == SentencePieceTokenizer.train(python_source[:1], 500, max_chars=5_000).model_proto


def test_training_lines_keep_indentation_and_skip_blank_and_overlong_lines():
    doc = "  a = 1  \n\n   \n" + "x" * (MAX_TRAINING_LINE_CHARS + 1) + "\n\tb\r\n" + "c\n" * 100
    assert _training_lines([doc], 10**6, 10**6, 0) == ["  a = 1  ", "\tb\r"] + ["c"] * 100
    # Lines are taken until max_chars (counting their newlines) is reached, then reading stops.
    assert _training_lines([doc, doc], 20, 10**6, 0) == ["  a = 1  ", "\tb\r", "c", "c", "c"]


def test_a_bare_string_is_one_text(python_source):
    one = SentencePieceTokenizer.train(python_source[0], 500)
    assert one.model_proto == SentencePieceTokenizer.train([python_source[0]], 500).model_proto
    assert one.vocab_size > MIN_SENTENCEPIECE_VOCAB  # not a vocabulary of single characters


def test_vocab_size_is_an_upper_bound():
    tok = SentencePieceTokenizer.train(["hello world, hello there\n"] * 3, 4096)
    # 261 fixed ids, the text's characters, and the few merges it supports.
    assert MIN_SENTENCEPIECE_VOCAB <= tok.vocab_size < 400
    assert tok.decode(tok.encode("hello ∑")) == "hello ∑"


def test_save_and_load_give_identical_encodings(sentencepiece, python_source, tmp_path):
    directory = sentencepiece.save(tmp_path / "sp")
    assert directory == tmp_path / "sp"
    meta = json.loads((directory / "tokenizer.json").read_text())
    assert meta["kind"] == "sentencepiece" and meta["vocab_size"] == 1024 and meta["eos_id"] == 3
    for loaded in [load_tokenizer(directory), SentencePieceTokenizer.load(directory / "tokenizer.model")]:
        assert isinstance(loaded, SentencePieceTokenizer)
        assert (loaded.vocab_size, loaded.pad_id, loaded.bos_id, loaded.eos_id) == (1024, 0, 2, 3)
        for text in [TRICKY, UNSEEN, MARK, python_source[2]]:
            assert loaded.encode(text) == sentencepiece.encode(text)


def test_training_is_quiet():
    code = ("from llm_jax.data.tokenizers import SentencePieceTokenizer as S\n"
            "S.train(['def f(x):\\n    return x\\n'] * 50, 400, 'unigram')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")


# ---------------------------------------------------------------------------- characters


def test_char_tokenizer_layout_and_round_trip():
    text = TRICKY + UNSEEN + "".join(EDGES)
    tok = CharTokenizer.from_text(text)
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, None)
    assert tok.chars == sorted(set(text))
    assert tok.vocab_size == len(set(text)) + 3
    assert tok.encode("\t\n") == [3 + tok.chars.index("\t"), 3 + tok.chars.index("\n")]
    for text in [TRICKY, UNSEEN, *EDGES]:
        assert tok.decode(tok.encode(text)) == text


def test_char_tokenizer_unknown_characters():
    tok = CharTokenizer.from_text("abc é")
    assert tok.encode("a€z") == [tok.encode("a")[0], tok.unk_id, tok.unk_id]
    assert tok.decode(tok.encode("a€")) == "a\ufffd"
    assert tok.decode([tok.eos_id, tok.pad_id, *tok.encode("cab"), tok.vocab_size]) == "cab\ufffd"
    assert [tok.token_bytes(i) for i in tok.encode("aé")] == [1, 2]
    assert tok.token_bytes(tok.eos_id) == tok.token_bytes(tok.unk_id) == 0


def test_char_save_and_load(tmp_path):
    tok = CharTokenizer.from_text(TRICKY)
    loaded = load_tokenizer(tok.save(tmp_path / "char"))
    assert isinstance(loaded, CharTokenizer)
    assert loaded.chars == tok.chars and loaded.encode(TRICKY) == tok.encode(TRICKY)


def test_train_tokenizer_dispatches_on_kind(python_source):
    char = train_tokenizer("char", ["abc", "cd"], 16)
    assert isinstance(char, CharTokenizer) and char.chars == ["a", "b", "c", "d"]
    sp = train_tokenizer("sentencepiece", python_source, 512, model_type="unigram")
    assert isinstance(sp, SentencePieceTokenizer) and sp.vocab_size == 512


# ----------------------------------------------------------------------------- bad input


def test_bad_training_arguments():
    with pytest.raises(ValueError, match=f"vocab_size=100 is too small.*at least {MIN_SENTENCEPIECE_VOCAB}"):
        SentencePieceTokenizer.train(["some text"], 100)
    with pytest.raises(ValueError, match=r"model_type='wordpiece'.*\('bpe', 'unigram'\)"):
        SentencePieceTokenizer.train(["x"], 1000, "wordpiece")
    with pytest.raises(ValueError, match="no text to train a tokenizer on"):
        SentencePieceTokenizer.train([], 1000)
    with pytest.raises(ValueError, match="no text to train a tokenizer on"):
        SentencePieceTokenizer.train(["", "\n\n  \n\t"], 1000)
    with pytest.raises(ValueError, match="max_chars=0"):
        SentencePieceTokenizer.train(["x"], 1000, max_chars=0)
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bytes'.*'sentencepiece', 'char'"):
        train_tokenizer("bytes", ["abc"], 100)


def test_vocab_too_small_for_the_texts_characters():
    text = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 100)) * 3  # 100 distinct, common characters
    with pytest.raises(ValueError, match=r"vocab_size=300 is too small for this text.*vocab_size >= 3\d\d"):
        SentencePieceTokenizer.train([text], 300)
    with pytest.raises(ValueError, match="5 distinct characters, 8 ids.*vocab_size=4"):
        train_tokenizer("char", ["abcde"], 4)


def test_bad_char_vocabularies():
    with pytest.raises(ValueError, match="empty text"):
        CharTokenizer.from_text("")
    with pytest.raises(ValueError, match="distinct single characters.*1 duplicates"):
        CharTokenizer(["a", "b", "a"])
    with pytest.raises(ValueError, match=r"bad entries \['ab'\]"):
        CharTokenizer(["ab", "c"])


def test_load_errors(tmp_path, sentencepiece):
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path / "nowhere")
    meta = tmp_path / "tokenizer.json"
    meta.write_text('{"kind": "wordpiece"}')
    with pytest.raises(ValueError, match=r"unknown tokenizer kind 'wordpiece'.*\('sentencepiece', 'char', 'hf'\)"):
        load_tokenizer(tmp_path)
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not valid JSON"):
        load_tokenizer(tmp_path)
    meta.write_text('{"kind": "sentencepiece"}')
    with pytest.raises(FileNotFoundError, match="no sentencepiece model file at .*tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="tokenizer.model is not a sentencepiece model"):
        load_tokenizer(tmp_path)
    sentencepiece.save(tmp_path)
    meta.write_text(json.dumps({"kind": "sentencepiece", "vocab_size": 2048}))
    with pytest.raises(ValueError, match="vocab_size=2048 but the loaded tokenizer has 1024"):
        load_tokenizer(tmp_path)
