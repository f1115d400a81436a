"""Hugging Face interop: tiny random transformers models, built offline, read and written back.

Every case checks parity with transformers itself (logits within 1e-4 in f32 and the same
20 greedy tokens), that our export loads in transformers with the same logits, and that
import -> export -> import is exact. Weights are randomised well away from the init (norm
scales and biases included) so that a tensor mapped to the wrong place cannot go unseen.
"""

import argparse
import dataclasses
import io
import json
import pathlib
import sysconfig

import jax
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llm_jax.config import MeshConfig, ModelConfig
from llm_jax.inference import generate
from llm_jax.interop import (
    HFTokenizer,
    InteropError,
    add_convert_args,
    load_hf_checkpoint,
    load_hf_tokenizer,
    main_convert,
    save_hf_checkpoint,
)
from llm_jax.models import Transformer, init_params
from llm_jax.models.presets import gpt2
from llm_jax.parallel import make_mesh, param_shardings, sharding_context
from llm_jax.training.checkpoint import load_trained_model

VOCAB = 300  # room for a byte-level BPE tokenizer (256 bytes + merges + specials)
LLAMA_SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=128, bos_token_id=None, eos_token_id=None)
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=16)  # short, so that most frequencies are rescaled

CASES = {
    "llama_mha_untied": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3_gqa_tied_rope_scaling": (transformers.LlamaConfig, dict(
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500_000.0, rope_scaling=LLAMA3_SCALING)),
    "qwen2_qkv_bias_gqa": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral_sliding_window_mqa": (transformers.MistralConfig, dict(
        num_key_value_heads=1, sliding_window=8, tie_word_embeddings=False)),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                           bos_token_id=None, eos_token_id=None)),
}
SEQ = 40  # longer than the sliding window
PROMPT = [5, 17, 42, 7, 99, 3, 250, 64, 8]
NEW_TOKENS = 20


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights, not the init's ones and zeros: norm scales near 1, biases and matrices spread."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name or ".ln_" in name):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.15 * noise)


def _build(case: str, directory: pathlib.Path, **save_kwargs) -> torch.nn.Module:
    config_cls, changes = CASES[case]
    fields = changes if config_cls is transformers.GPT2Config else {**LLAMA_SHAPE, **changes}
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**fields))
    _randomize(model, seed=len(case))
    model.eval()
    model.generation_config.eos_token_id = None  # generate all NEW_TOKENS, as ours does
    model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
    return model


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _our_logits(cfg, params, tokens) -> np.ndarray:
    return np.asarray(jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)[0])(params, tokens))


def _tokens(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (2, SEQ))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """One saved random model per case, transformers' logits on fixed tokens, and our import."""
    directory = tmp_path_factory.mktemp(request.param)
    model = _build(request.param, directory)
    cfg, params = load_hf_checkpoint(directory)
    return dict(dir=directory, model=model, logits=_hf_logits(model, _tokens()), cfg=cfg, params=params)


def _same_params(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and jax.tree.all(
        jax.tree.map(lambda x, y: x.dtype == y.dtype and bool(np.array_equal(x, y)), a, b))


# ----------------------------------------------------------------------- parity, per case


def test_import_matches_transformers_logits_and_greedy_generation(case):
    cfg, params = case["cfg"], case["params"]
    np.testing.assert_allclose(_our_logits(cfg, params, _tokens()), case["logits"], atol=1e-4, rtol=0)
    ours = generate(params, cfg, [PROMPT], max_new_tokens=NEW_TOKENS, sampling={"temperature": 0.0}).tokens[0]
    assert ours == _hf_greedy(case["model"], PROMPT)


def test_export_loads_in_transformers_and_reimports_exactly(case, tmp_path):
    cfg, params = case["cfg"], case["params"]
    save_hf_checkpoint(params, cfg, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(case["model"])
    np.testing.assert_allclose(_hf_logits(reloaded, _tokens()), case["logits"], atol=1e-5, rtol=0)
    # The files themselves: the same tensors, bit for bit, under the same names.
    original, written = load_file(case["dir"] / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert original.keys() == written.keys()
    for name in original:
        assert np.array_equal(original[name], written[name]), name
    cfg2, params2 = load_hf_checkpoint(tmp_path)
    assert cfg2 == cfg and _same_params(params, params2)


# Models born in llm_jax, written out: each lands in the family that expresses it.
FROM_OURS = {
    "llama_mha_tied": (ModelConfig(vocab_size=VOCAB, init_std=0.3), "LlamaForCausalLM"),
    "llama_gqa_linear_rope_unscanned": (ModelConfig(
        vocab_size=VOCAB, n_kv_heads=2, rope_scaling="linear", rope_scaling_factor=2.0, tie_embeddings=False,
        scan_layers=False, init_std=0.3), "LlamaForCausalLM"),
    "qwen2_sliding_window": (ModelConfig(vocab_size=VOCAB, n_kv_heads=1, qkv_bias=True, sliding_window=8,
                                         init_std=0.3), "Qwen2ForCausalLM"),
    "mistral": (ModelConfig(vocab_size=VOCAB, sliding_window=8, tie_embeddings=False, init_std=0.3),
                "MistralForCausalLM"),
    "gpt2": (gpt2(64, 2, 4, vocab_size=VOCAB, max_seq_len=128, init_std=0.3), "GPT2LMHeadModel"),
}


@pytest.mark.parametrize("name", list(FROM_OURS))
def test_llm_jax_model_exports_with_logit_parity(name, tmp_path):
    cfg, architecture = FROM_OURS[name]
    params = init_params(cfg, jax.random.key(0))
    save_hf_checkpoint(params, cfg, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == architecture
    np.testing.assert_allclose(_hf_logits(reloaded, _tokens()), _our_logits(cfg, params, _tokens()), atol=1e-4,
                               rtol=0)


# ----------------------------------------------------------------- layouts and placement


def test_sharded_checkpoint_into_unscanned_layers(tmp_path):
    model = _build("llama3_gqa_tied_rope_scaling", tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    cfg, params = load_hf_checkpoint(tmp_path, scan_layers=False)
    assert not cfg.scan_layers and "layers_1" in params and "layers" not in params
    np.testing.assert_allclose(_our_logits(cfg, params, _tokens()), _hf_logits(model, _tokens()), atol=1e-4, rtol=0)


def test_sharded_export_writes_an_index_that_transformers_reads(tmp_path):
    model = _build("qwen2_qkv_bias_gqa", tmp_path / "hf")
    cfg, params = load_hf_checkpoint(tmp_path / "hf")
    save_hf_checkpoint(params, cfg, tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(_hf_logits(reloaded, _tokens()), _hf_logits(model, _tokens()), atol=1e-5, rtol=0)
    cfg2, params2 = load_hf_checkpoint(tmp_path / "out")
    assert cfg2 == cfg and _same_params(params, params2)


def test_bfloat16_checkpoint_stays_bfloat16_and_round_trips_exactly(tmp_path):
    model = _build("gpt2", tmp_path / "f32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    cfg, params = load_hf_checkpoint(tmp_path / "bf16")
    assert cfg.param_dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
    save_hf_checkpoint(params, cfg, tmp_path / "out")
    original = load_file(tmp_path / "bf16" / "model.safetensors")
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert original.keys() == written.keys()
    assert all(np.array_equal(original[k].view(np.uint16), written[k].view(np.uint16)) for k in original)


def test_gpt2_saved_without_prefix_with_mask_buffers_in_bfloat16(tmp_path):
    """As the original gpt2 repository stores it: GPT2Model's names and f32 causal-mask buffers."""
    _build("gpt2", tmp_path)
    cfg32, params32 = load_hf_checkpoint(tmp_path)

    def as_gpt2_model(tensors):
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name).astype(jax.numpy.bfloat16)
        for i in range(cfg32.n_layers):
            tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.float32))
            tensors[f"h.{i}.attn.masked_bias"] = np.asarray(-1e4, np.float32)

    _edit_weights(tmp_path, as_gpt2_model)
    cfg, params = load_hf_checkpoint(tmp_path)
    assert cfg == dataclasses.replace(cfg32, param_dtype="bfloat16")  # the buffers' f32 does not count
    assert _same_params(params, jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), params32))


def test_import_onto_a_mesh_shards_the_params_and_keeps_the_logits(tmp_path):
    model = _build("llama_mha_untied", tmp_path)
    # The layer stack is split too (pipeline): each layer is written into a sharded stack.
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, pipeline=2))
    cfg, params = load_hf_checkpoint(tmp_path, mesh)
    want = param_shardings(cfg, mesh)
    same = jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), params, want)
    assert jax.tree.all(same), same
    query = params["layers"]["attention"]["query"]["kernel"]  # [L, D, N, H] over pipeline, fsdp, tensor
    assert query.shape == (2, 64, 4, 16)
    assert {s.data.shape for s in query.addressable_shards} == {(1, 32, 2, 16)}
    with sharding_context(mesh):
        logits = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)[0])(params, _tokens())
    np.testing.assert_allclose(np.asarray(logits), _hf_logits(model, _tokens()), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- tokenizers


def _texts() -> list[str]:
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / name).read_text() for name in ("textwrap.py", "string.py")]


SAMPLES = ["def f(x):\n\treturn  'é' + x  \n", "中文 🙂 ünïcödé", ""]


def _byte_level_tokenizer(directory: pathlib.Path) -> transformers.PreTrainedTokenizerFast:
    """A Llama-3-like byte-level BPE that adds <s>, saved as transformers saves one."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    return fast


def test_hf_tokenizer_matches_transformers_and_round_trips(tmp_path):
    hf = _byte_level_tokenizer(tmp_path / "hf")
    tok = load_hf_tokenizer(tmp_path / "hf")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (VOCAB, 0, 1, 1)  # no pad token: eos pads
    with_specials = load_hf_tokenizer(tmp_path / "hf", add_special_tokens=True)
    for text in SAMPLES + [_texts()[0][:2000]]:
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
        assert with_specials.encode(text) == hf(text)["input_ids"]
        assert tok.decode(with_specials.encode(text)) == text
        assert sum(tok.token_bytes(i) for i in tok.encode(text)) == len(text.encode())
    assert tok.token_bytes(tok.eos_id) == 0
    tok.save(tmp_path / "run_tokenizer")
    assert json.loads((tmp_path / "run_tokenizer" / "tokenizer.json").read_text())["kind"] == "hf"
    again = load_hf_tokenizer(tmp_path / "run_tokenizer")
    assert (again.vocab_size, again.bos_id, again.eos_id) == (tok.vocab_size, tok.bos_id, tok.eos_id)
    assert all(again.encode(t) == tok.encode(t) for t in SAMPLES)


def test_sentencepiece_only_checkpoint_tokenizer(tmp_path):
    """Llama 2 style: only a sentencepiece model (byte fallback), ids from the model itself."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter("\n".join(_texts()).splitlines()), model_writer=model,
                                   vocab_size=512, model_type="bpe", byte_fallback=True, pad_id=0, unk_id=1,
                                   bos_id=2, eos_id=3, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tok = HFTokenizer.load(tmp_path, add_special_tokens=True)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (512, 2, 3, 0)
    for text in SAMPLES[1:]:  # sentencepiece's default normalization folds whitespace runs
        assert tok.encode(text) == [2] + sp.encode(text)
        assert tok.decode(tok.encode(text)) == text
        # The default dummy prefix: the first piece carries a space the text did not have.
        assert sum(tok.token_bytes(i) for i in tok.encode(text)) == len(text.encode()) + (text != "")
    again = load_hf_tokenizer(tok.save(tmp_path / "saved"))
    assert again.encode(SAMPLES[0]) == tok.encode(SAMPLES[0])


# ------------------------------------------------------------------ run directories, CLI


def test_convert_to_a_run_directory_and_back(tmp_path):
    hf_dir = tmp_path / "hf"
    model = _build("llama3_gqa_tied_rope_scaling", hf_dir)
    hf_tok = _byte_level_tokenizer(hf_dir)
    parser = argparse.ArgumentParser()
    add_convert_args(parser)

    assert main_convert(parser.parse_args(["--from-hf", str(hf_dir), "--out", str(tmp_path / "run")])) == 0
    config, params, step = load_trained_model(tmp_path / "run")
    assert step == 0 and config.model.rope_scaling == "llama3" and config.model.vocab_size == VOCAB
    np.testing.assert_allclose(_our_logits(config.model, params, _tokens()), _hf_logits(model, _tokens()),
                               atol=1e-4, rtol=0)
    run_tok = load_hf_tokenizer(tmp_path / "run" / "tokenizer")
    assert run_tok.encode(SAMPLES[0]) == hf_tok(SAMPLES[0], add_special_tokens=False)["input_ids"]

    assert main_convert(parser.parse_args(["--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")])) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(_hf_logits(reloaded, _tokens()), _hf_logits(model, _tokens()), atol=1e-5, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")(SAMPLES[0])["input_ids"] == \
        hf_tok(SAMPLES[0])["input_ids"]
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (0, 1)


def test_a_run_with_our_own_tokenizer_exports_its_special_ids(tmp_path):
    from llm_jax.data.tokenizers import CharTokenizer
    from llm_jax.interop.convert import convert_to_hf, write_run_dir
    from llm_jax.models import init_params

    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, d_ff=48, max_seq_len=32)
    tokenizer = CharTokenizer(list("abc"))
    write_run_dir(tmp_path / "run", init_params(cfg, jax.random.key(0)), cfg, tokenizer)
    with pytest.warns(UserWarning, match="no tokenizer files"):
        convert_to_hf(tmp_path / "run", tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"], exported["pad_token_id"]) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)


# ------------------------------------------------------------------------------ bad input


def _config(directory: pathlib.Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def _write_config(directory: pathlib.Path, **changes) -> None:
    (directory / "config.json").write_text(json.dumps({**_config(directory), **changes}))


@pytest.fixture
def llama_dir(tmp_path):
    _build("qwen2_qkv_bias_gqa", tmp_path)
    return tmp_path


def test_unsupported_model_type_names_the_supported_ones(llama_dir):
    _write_config(llama_dir, model_type="bert", architectures=["BertForMaskedLM"])
    with pytest.raises(InteropError, match="model_type='bert'") as e:
        load_hf_checkpoint(llama_dir)
    assert all(name in str(e.value) for name in ("llama", "mistral", "qwen2", "gpt2"))


def test_malformed_config_and_index_files_are_named(llama_dir):
    (llama_dir / "config.json").write_text("{not json")
    with pytest.raises(InteropError, match="config.json is not valid JSON"):
        load_hf_checkpoint(llama_dir)
    (llama_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(InteropError, match="holds a JSON list"):
        load_hf_checkpoint(llama_dir)


def test_config_values_of_the_wrong_type_are_named(llama_dir):
    _write_config(llama_dir, num_hidden_layers="2")
    with pytest.raises(InteropError, match="model.n_layers must be a number, got '2'"):
        load_hf_checkpoint(llama_dir)
    _write_config(llama_dir, num_hidden_layers=2)
    (llama_dir / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(InteropError, match="needs a \"weight_map\""):
        load_hf_checkpoint(llama_dir)


def test_unsupported_features_are_refused_by_name(llama_dir):
    _write_config(llama_dir, architectures=["Qwen2ForSequenceClassification"])
    with pytest.raises(InteropError, match="Qwen2ForCausalLM"):
        load_hf_checkpoint(llama_dir)
    _write_config(llama_dir, architectures=["Qwen2ForCausalLM"], hidden_act="gelu")
    with pytest.raises(InteropError, match="hidden_act='gelu'.*allowed: 'silu'"):
        load_hf_checkpoint(llama_dir)
    _write_config(llama_dir, hidden_act="silu", rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(InteropError, match="rope_type='yarn'.*llama3"):
        load_hf_checkpoint(llama_dir)
    _write_config(llama_dir, rope_parameters=None, head_dim=32)
    with pytest.raises(InteropError, match="head_dim=32"):
        load_hf_checkpoint(llama_dir)
    _write_config(llama_dir, head_dim=16, layer_types=["full_attention", "sliding_attention"], sliding_window=8)
    with pytest.raises(InteropError, match="layer_types"):
        load_hf_checkpoint(llama_dir)


def _edit_weights(directory: pathlib.Path, edit) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named_with_its_shape(llama_dir):
    _edit_weights(llama_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    name = r"'model\.layers\.1\.self_attn\.k_proj\.bias'"
    with pytest.raises(InteropError, match=rf"missing tensor {name} of shape \(32,\)"):
        load_hf_checkpoint(llama_dir)


def test_extra_tensor_is_named(llama_dir):
    _edit_weights(llama_dir, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros((3, 4), np.float32)}))
    name = r"'model\.layers\.0\.mlp\.extra\.weight'"
    with pytest.raises(InteropError, match=rf"unexpected tensor {name} of shape \(3, 4\)"):
        load_hf_checkpoint(llama_dir)


def test_wrong_shape_names_the_tensor_and_both_shapes(llama_dir):
    _edit_weights(llama_dir, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((95, 64), np.float32)}))
    with pytest.raises(InteropError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(95, 64\) "
                                           r"but config\.json implies \(96, 64\)"):
        load_hf_checkpoint(llama_dir)


def test_pickled_checkpoint_is_refused(llama_dir):
    (llama_dir / "model.safetensors").rename(llama_dir / "pytorch_model.bin")  # only the name matters
    with pytest.raises(InteropError, match="pytorch_model.bin.*safetensors only.*execute arbitrary code"):
        load_hf_checkpoint(llama_dir)


def test_missing_config_json(llama_dir):
    (llama_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_checkpoint(llama_dir)


def test_export_refuses_a_model_without_a_hugging_face_family(tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, position="alibi")
    with pytest.raises(InteropError, match="model.position='alibi'"):
        save_hf_checkpoint({}, cfg, tmp_path)
    cfg = dataclasses.replace(ModelConfig(vocab_size=VOCAB), activation="geglu")
    with pytest.raises(InteropError, match="model.activation='geglu'.*hidden_act allows 'silu'"):
        save_hf_checkpoint({}, cfg, tmp_path)
    assert not list(tmp_path.iterdir())  # refused before anything was written
