"""The grain pipeline: packing keeps every token once, in order, with correct segments."""

import random

import numpy as np
import pytest

from llm_jax.data.pipeline import first_batches, packed_batches, packed_row, sample_text
from llm_jax.data.tokenizers import CharTokenizer


def _documents(n=40, seed=0):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "pi", "rho", "omega"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(n)]


DOCS = _documents()
TOKENIZER = CharTokenizer.from_text("".join(DOCS))


def test_packing_keeps_every_token_once_in_order():
    batches = list(packed_batches(DOCS, TOKENIZER, seq_len=16, batch_size=2, train=False))
    expected = np.concatenate([TOKENIZER.encode(d) + [TOKENIZER.eos_id] for d in DOCS])
    rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1) for b in batches])
    stream = rows.reshape(-1)
    # Rows are seq_len + 1 tokens cut from the stream without overlap or padding; the
    # final partial batch is dropped, so the stream is a prefix of the documents.
    assert rows.shape[1] == 17
    assert len(stream) > 0.8 * len(expected)
    np.testing.assert_array_equal(stream, expected[: len(stream)])


def test_segments_positions_and_loss_mask_follow_document_boundaries():
    for batch in packed_batches(DOCS, TOKENIZER, seq_len=24, batch_size=4, train=False):
        for inputs, targets, seg, pos, mask in zip(batch["inputs"], batch["targets"], batch["segment_ids"],
                                                   batch["positions"], batch["loss_mask"]):
            assert seg[0] == 1 and pos[0] == 0
            starts = np.flatnonzero(np.diff(seg)) + 1  # a new document piece begins
            np.testing.assert_array_equal(pos[starts], 0)
            np.testing.assert_array_equal(inputs[starts - 1], TOKENIZER.eos_id)  # the previous one ended
            np.testing.assert_array_equal(np.diff(pos)[np.diff(seg) == 0], 1)
            # No loss on a target that starts the next document (its input is the previous
            # document's eos); loss everywhere else.
            np.testing.assert_array_equal(mask, inputs != TOKENIZER.eos_id)


def test_packed_row_masks_padding():
    row = {"tokens": np.array([5, 6, 1, 7, 0, 0]), "tokens_segment_ids": np.array([1, 1, 1, 2, 0, 0]),
           "tokens_positions": np.array([0, 1, 2, 0, 0, 0])}
    out = packed_row(row)
    np.testing.assert_array_equal(out["inputs"], [5, 6, 1, 7, 0])
    np.testing.assert_array_equal(out["targets"], [6, 1, 7, 0, 0])
    np.testing.assert_array_equal(out["loss_mask"], [1, 1, 0, 0, 0])


def test_training_stream_repeats_and_reshuffles_each_epoch():
    docs = [c * 3 for c in "abcdefgh"]  # 3 characters + eos = one 4-token row per document
    tok = CharTokenizer.from_text("".join(docs))
    it = iter(packed_batches(docs, tok, seq_len=3, batch_size=1, train=True, seed=3))
    rows = [tok.decode(next(it)["inputs"][0][:1]) for _ in range(3 * len(docs))]
    epochs = [rows[i * 8:(i + 1) * 8] for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list("abcdefgh")  # every document once per epoch
    assert len({"".join(e) for e in epochs}) == 3  # a new order every epoch


def test_iterator_state_resumes_on_exactly_the_next_batch():
    ds = packed_batches(DOCS, TOKENIZER, seq_len=16, batch_size=3, train=True, seed=7)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_processes_read_disjoint_documents_covering_the_corpus():
    docs = [f"doc{i:03d}" for i in range(12)]
    tok = CharTokenizer.from_text("".join(docs))

    def seen(index):
        batches = packed_batches(docs, tok, seq_len=5, batch_size=1, train=False, process_index=index, process_count=2)
        text = tok.decode(np.concatenate([np.concatenate([b["inputs"][0], b["targets"][0, -1:]]) for b in batches]))
        return {f"doc{text[i + 3:i + 6]}" for i in range(len(text)) if text.startswith("doc", i)}

    a, b = seen(0), seen(1)
    assert a and b and not a & b
    assert a | b == set(docs)


def test_first_batches_stops_early_on_a_short_split():
    ds = packed_batches(DOCS[:2], TOKENIZER, seq_len=16, batch_size=1, train=False)
    got = list(first_batches(ds, 1000))
    assert 0 < len(got) < 1000


def test_sample_text_is_seeded_and_bounded():
    a = list(sample_text(DOCS, 200, seed=1))
    assert a == list(sample_text(DOCS, 200, seed=1))
    assert a != list(sample_text(DOCS, 200, seed=2))
    assert sum(map(len, a[:-1])) < 200 <= sum(map(len, a))


def test_bad_inputs():
    with pytest.raises(ValueError, match="no documents"):
        packed_batches([], TOKENIZER, seq_len=8, batch_size=1, train=True)
    with pytest.raises(ValueError, match="positive"):
        packed_batches(DOCS, TOKENIZER, seq_len=0, batch_size=1, train=True)
