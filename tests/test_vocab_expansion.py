"""Vocabulary expansion: new sentencepiece pieces, stable ids, grown embeddings, unchanged outputs."""

import dataclasses
import re

import jax
import numpy as np
import pytest

from llm_jax import experiment
from llm_jax.cli import main as cli_main
from llm_jax.data.tokenizers import CharTokenizer, SentencePieceTokenizer, load_tokenizer
from llm_jax.data.vocab import add_tokens
from llm_jax.models import Transformer, init_params
from llm_jax.training.checkpoint import load_trained_model, save_model_checkpoint
from llm_jax.training.vocab_expansion import expand_run

TEXT = "\n".join(f"def compute_{w}(x):\n    return x * {i} + offset_{w}\n" for i, w in enumerate(
    "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split())) * 4
NEW_TOKENS = ["kubernetes", "def compute", "xyzzy"]
PLAIN = "    return x * 3 + offset_alpha\n"  # none of the new tokens occurs in it


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An untied model's run directory and its expansion."""
    root = tmp_path_factory.mktemp("vocab")
    tokenizer = SentencePieceTokenizer.train([TEXT], vocab_size=300)
    cfg = experiment.load("debug", [f"model.vocab_size={tokenizer.vocab_size}", "model.tie_embeddings=false",
                                    "model.d_model=32", "model.n_layers=1", "model.max_seq_len=64"])
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(root / "old")))
    params = jax.tree.map(np.asarray, init_params(cfg.model, jax.random.key(0)))
    save_model_checkpoint(root / "old", cfg, params, step=7)
    tokenizer.save(root / "old" / "tokenizer")
    out, expansion = expand_run(root / "old", NEW_TOKENS, root / "new")
    return root / "old", out, expansion


def test_new_pieces_get_new_ids_and_old_ids_stay(runs):
    old_dir, new_dir, expansion = runs
    old, new = load_tokenizer(old_dir / "tokenizer"), load_tokenizer(new_dir / "tokenizer")
    assert new.vocab_size == old.vocab_size + len(NEW_TOKENS)
    assert all(old.processor.id_to_piece(i) == new.processor.id_to_piece(i) for i in range(old.vocab_size))
    for k, token in enumerate(NEW_TOKENS):
        assert new.encode(token) == [old.vocab_size + k]
        assert list(expansion.splits[k]) == old.encode(token) and len(expansion.splits[k]) > 1
    assert new.encode(PLAIN) == old.encode(PLAIN) and new.decode(new.encode(PLAIN)) == PLAIN
    text = "run kubernetes: def compute_beta"
    assert new.decode(new.encode(text)) == text and old.vocab_size in new.encode(text)


def test_outputs_on_old_text_unchanged_and_new_rows_are_means(runs):
    old_dir, new_dir, expansion = runs
    old_cfg, old_params, _ = load_trained_model(old_dir)
    new_cfg, new_params, step = load_trained_model(new_dir)
    assert step == 7 and new_cfg.model.vocab_size == old_cfg.model.vocab_size + len(NEW_TOKENS)
    tokens = np.asarray([load_tokenizer(old_dir / "tokenizer").encode(PLAIN)])
    old_logits, _ = Transformer(old_cfg.model).apply({"params": old_params}, tokens)
    new_logits, _ = Transformer(new_cfg.model).apply({"params": new_params}, tokens)
    v = old_cfg.model.vocab_size
    assert new_logits.shape[-1] == v + len(NEW_TOKENS)
    np.testing.assert_allclose(np.asarray(new_logits[..., :v]), np.asarray(old_logits), rtol=0, atol=1e-6)
    for k, split in enumerate(expansion.splits):
        np.testing.assert_allclose(new_params["embed"]["embedding"][v + k],
                                   np.asarray(old_params["embed"]["embedding"])[list(split)].mean(0), atol=1e-6)
        np.testing.assert_allclose(new_params["unembed"]["kernel"][:, v + k],
                                   np.asarray(old_params["unembed"]["kernel"])[:, list(split)].mean(1), atol=1e-6)


def test_generate_loads_the_expanded_run(runs, capsys):
    _, new_dir, _ = runs
    assert cli_main(["generate", "--checkpoint", str(new_dir), "--prompt", "kubernetes def", "max_new_tokens=3"]) == 0
    assert "kubernetes def" in capsys.readouterr().out


def test_bad_expansions_are_refused(runs, tmp_path):
    old_dir, new_dir, _ = runs
    with pytest.raises(ValueError, match="sentencepiece"):
        add_tokens(CharTokenizer.from_text("abc"), ["ab"])
    tokenizer = load_tokenizer(old_dir / "tokenizer")
    for bad in ([], [""], ["a\nb"]):
        with pytest.raises(ValueError):
            add_tokens(tokenizer, bad)
    assert add_tokens(tokenizer, ["x", "zq"]).skipped == ("x",)  # already a single piece
    with pytest.raises(FileExistsError):
        expand_run(old_dir, ["zzz"], new_dir)
    assert cli_main(["expand-vocab", "--checkpoint", str(old_dir), "--out", str(tmp_path / "x")]) == 2


def test_expand_vocab_command_reads_tokens_from_flags_and_a_file(runs, tmp_path, capsys):
    old_dir, _, _ = runs
    (tmp_path / "tokens.txt").write_text("kubernetes\n\nxyzzy\n")
    assert cli_main(["expand-vocab", "--checkpoint", str(old_dir), "--out", str(tmp_path / "new"),
                     "--token", "def compute", "--tokens-file", str(tmp_path / "tokens.txt")]) == 0
    v = load_tokenizer(old_dir / "tokenizer").vocab_size
    out = capsys.readouterr().out
    for k, token in enumerate(["def compute", "kubernetes", "xyzzy"]):
        assert re.search(rf"^\s*{v + k}\s+{token!r}", out, re.MULTILINE), out
    assert load_tokenizer(tmp_path / "new" / "tokenizer").encode("xyzzy") == [v + 2]
